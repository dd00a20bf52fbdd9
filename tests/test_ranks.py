"""The top-rank index (core/ranks.py): its positions are the bands' order exactly, and a candidate
built from it is the per-candidate pass's candidate bit for bit (both spaces, 16-bit and float64 τ,
ties, a restricted domain), while the index stays bounded."""
import numpy as np
import pytest
import torch

from nps_pruning.core.bands import make_bands
from nps_pruning.core.entries import candidate_entries
from nps_pruning.core.mask import keep_count
from nps_pruning.core.prepared import prepare
from nps_pruning.core.ranks import (maybe_rank_positions, rank_positions, rank_prefixes,
                                    ranks_needed)
from nps_pruning.core.space import make_hybrid_index


def _reference_order(v: torch.Tensor) -> torch.Tensor:
    """The bands' total order, plainly: |τ| in float32 descending, ties by flat index."""
    a = v.float().abs().double().numpy()
    return torch.from_numpy(np.lexsort((np.arange(a.size), -a)))


def _vectors():
    gen = torch.Generator().manual_seed(1)
    for D in (1, 9, 300, 5000):
        for trial in range(6):
            v = torch.randn(D, generator=gen, dtype=torch.float64) * (torch.rand(D, generator=gen) < 0.7)
            if trial % 2 == 0:
                v = torch.round(v * 3) / 3                 # heavy ties, many zeros
            dtype = (torch.float32, torch.float64, torch.float16, torch.bfloat16)[trial % 4]
            yield D, trial, v.to(dtype)


def test_rank_positions_are_the_bands_order():
    for D, trial, v in _vectors():
        sd = v.dtype if v.dtype in (torch.float16, torch.bfloat16) else torch.float32
        bands = make_bands(v, 1 + trial, "focused", 0.05, sorted_dtype=sd)
        ref = _reference_order(v)
        for L in {1, D // 3, D - 1, D}:
            if L < 1:
                continue
            got = rank_positions(v, bands, L)
            assert got.dtype == torch.int32
            assert torch.equal(got.long(), ref[:L]), (D, trial, L)
            assert torch.equal(bands.sorted_abs[:L].float(), v.float().abs()[got.long()])


def _points(rng, M, n):
    pts = [np.concatenate([np.ones(M), [0.0, 0.0, 0.0]]),        # magnitude top-k
           np.concatenate([np.ones(M), [0.0, 1.0, 0.0]])]        # DARE
    for i in range(n):
        w = rng.uniform(0, 3, M)
        w[rng.integers(M)] = 0.0 if i % 2 else w[0]              # a zero band / equal weights
        pts.append(np.concatenate([w, [rng.uniform(-1, 2), (0.0, 1.0, rng.uniform(0, 1))[i % 3],
                                       rng.uniform(-1, 1), (0.0, 2.0)[i % 2]]]))   # β = 0 / 2
    return pts


def test_a_candidate_from_the_rank_index_is_the_pass_candidate_bit_for_bit():
    for D, trial, v in _vectors():
        for r, scheme, M in ((0.05, "focused", 8), (0.3, "uniform", 3), (1.0, "focused", 5),
                             (0.002, "focused", 8)):
            bands = make_bands(v, M, scheme, r)
            index = make_hybrid_index(v, seed=trial)
            ranks = rank_positions(v, bands, ranks_needed(bands, keep_count(D, r)))
            rng = np.random.default_rng(D + trial)
            for p in _points(rng, M, 6):
                for space, kv, point in (("hybrid", "weighted", p), ("magnitude", "weighted", p[:M]),
                                         ("magnitude", "original", p[:M])):
                    a_idx, a_val = candidate_entries(space, v, bands, index, point, r, kept_values=kv)
                    b_idx, b_val = candidate_entries(space, v, bands, index, point, r, kept_values=kv,
                                                     ranks=ranks)
                    assert b_idx.dtype == torch.int64 and b_val.dtype == torch.float32
                    assert torch.equal(a_idx, b_idx), (D, trial, r, space, kv)
                    assert torch.equal(a_val.view(torch.int32), b_val.view(torch.int32))


def test_prepared_entries_are_the_same_with_and_without_the_index_on_a_domain():
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(4000, generator=gen)
    v[1000:1500] = 0.0                                           # an unchanged tensor: left out
    spans = [(0, 1000), (1000, 1500), (1500, 4000)]
    for space in ("hybrid", "magnitude"):
        fast = prepare(v, spans, keep=0.05, num_bands=8, space=space, seed=2)
        slow = prepare(v, spans, keep=0.05, num_bands=8, space=space, seed=2)
        slow.use_ranks = False
        assert fast.ranks() is not None and slow.ranks() is None
        assert not fast.domain.is_whole
        rng = np.random.default_rng(0)
        for p in _points(rng, 8, 5):
            p = p if space == "hybrid" else p[:8]
            a, b = fast.entries(p), slow.entries(p)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
            assert torch.equal(fast.build(p), slow.build(p))


def test_the_index_is_bounded_and_a_short_one_is_refused():
    v = torch.randn(10000, generator=torch.Generator().manual_seed(0))
    bands = make_bands(v, 8, "focused", 0.05)
    k = keep_count(v.numel(), 0.05)
    L = ranks_needed(bands, k)
    assert L == bands.starts[7] + k                              # the focused bands' top, + k of the rest
    assert maybe_rank_positions(v, bands, k, limit=L - 1) is None
    assert maybe_rank_positions(v, bands, k, limit=L).numel() == L
    short = rank_positions(v, bands, 10)
    with pytest.raises(ValueError, match="shorter"):
        rank_prefixes(short, bands, [11] + [0] * 7)
