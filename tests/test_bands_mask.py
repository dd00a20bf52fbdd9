"""Bands and the fast exact candidate mask (SPEC §1) against the sort-based definition."""
from __future__ import annotations

import pytest
import torch

from nps_pruning.core import (Bands, band_counts, band_starts, build_candidate, candidate_mask,
                              keep_count, make_bands, reference_mask, topk_mask)
from nps_pruning.core import mask as mask_mod


def _rank_order(values):
    return torch.sort(values.float().abs(), descending=True, stable=True).indices


def _case(i: int, gen: torch.Generator):
    """One random case of the seeded sweep: (values, bands, weights, r)."""
    D = int(torch.randint(1, 5001, (1,), generator=gen)) if i % 7 else int(torch.randint(1, 12, (1,), generator=gen))
    v = torch.randn(D, generator=gen) * float(torch.rand(1, generator=gen) * 3 + 0.01)
    kind = i % 6
    if kind == 1:                      # few magnitude levels: many exact ties
        v = torch.round(v * 2) / 2
    elif kind == 2:                    # many exact zeros
        v[torch.rand(D, generator=gen) < 0.6] = 0.0
    elif kind == 3:                    # bf16-like: coarse values, heavy ties
        v = v.to(torch.bfloat16).float()
    M = (1, 2, 8, 20, 3, 8)[i % 6 if i % 5 else (i // 5) % 6]
    scheme = ("uniform", "focused")[i % 2]
    r = (0.05, 1.0, 0.3, 1e-9, 0.5, 0.01, 0.9)[i % 7]
    band_r = r if r >= 0.01 else 0.05
    bands = make_bands(v, M, scheme, keep_ratio=band_r, focus=(3.0, 2.0, 50.0)[i % 3])
    w = torch.rand(M, generator=gen) * 2.5
    wk = (i // 2) % 5
    if wk == 1:
        w[torch.rand(M, generator=gen) < 0.5] = 0.0       # some bands switched off
    elif wk == 2:
        w = torch.round(w * 2) / 2                         # product ties across bands
    elif wk == 3:
        w = torch.ones(M)
    elif wk == 4:
        w = torch.zeros(M)
        w[0] = 1.0
    return v, bands, w, r


def test_candidate_mask_equals_reference_sweep():
    gen = torch.Generator().manual_seed(1234)
    for i in range(240):
        v, bands, w, r = _case(i, gen)
        fast = candidate_mask(v, bands, w, r)
        ref = reference_mask(v, bands, w, r)
        assert fast.dtype == torch.bool and fast.shape == v.shape
        assert torch.equal(fast, ref), f"case {i}: D={v.numel()} M={bands.num_bands} r={r} w={w}"
        k = keep_count(v.numel(), r)
        assert int(fast.sum()) == k
        # counts are rank-prefixes of each band summing to k
        counts = band_counts(bands, w, k)
        assert sum(counts) == k
        band_kept = torch.bincount(bands.band_of[fast].long(), minlength=bands.num_bands)
        assert band_kept.tolist() == counts
        ranks = torch.empty(v.numel(), dtype=torch.long)
        ranks[_rank_order(v)] = torch.arange(v.numel())
        for b in range(bands.num_bands):
            kept_ranks = torch.sort(ranks[fast & (bands.band_of == b)]).values
            expect = torch.arange(bands.starts[b], bands.starts[b] + counts[b])
            assert torch.equal(kept_ranks, expect)
        # the kept keys are the top-k keys (topk's tie choice is arbitrary, its values are not)
        key = w.float()[bands.band_of.long()] * v.abs()
        assert torch.equal(torch.sort(key[fast]).values, torch.sort(torch.topk(key, k).values).values)
        # the built candidate agrees with the mask
        cand = build_candidate(v, bands, w, r)
        expected = torch.where(fast, v * w.float()[bands.band_of.long()], torch.zeros(()))
        assert torch.equal(cand, expected)
        if bool((v[fast] != 0).all()) and bool((w.float()[bands.band_of.long()][fast] != 0).all()):
            assert int(torch.count_nonzero(cand)) == k


def test_small_chunks_with_ties_across_chunk_boundaries(monkeypatch):
    # force many chunks so the flat-index tie quota must carry across them
    monkeypatch.setattr(mask_mod, "CHUNK", 7)
    gen = torch.Generator().manual_seed(5)
    for i in range(40):
        D = int(torch.randint(20, 400, (1,), generator=gen))
        v = torch.randint(-3, 4, (D,), generator=gen).float()
        M = (1, 3, 8)[i % 3]
        bands = make_bands(v, M, ("uniform", "focused")[i % 2], keep_ratio=0.1)
        w = torch.randint(0, 3, (M,), generator=gen).float()
        r = (0.1, 0.37, 0.05, 0.8)[i % 4]
        assert torch.equal(candidate_mask(v, bands, w, r), reference_mask(v, bands, w, r))
        base = torch.randn(D, generator=gen)
        m = reference_mask(v, bands, w, r)
        out = build_candidate(v, bands, w, r, base=base, kept_values="original")
        assert torch.equal(out, base + torch.where(m, v, torch.zeros(())))


def test_weights_one_is_magnitude_topk():
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(3000, generator=gen)
    v[:50] = 0.25     # ties
    for scheme in ("uniform", "focused"):
        bands = make_bands(v, 8, scheme, keep_ratio=0.05)
        m = candidate_mask(v, bands, torch.ones(8), 0.05)
        assert torch.equal(m, topk_mask(v.abs(), keep_count(3000, 0.05)))
        ref = torch.zeros(3000, dtype=torch.bool)
        ref[_rank_order(v)[:150]] = True
        assert torch.equal(m, ref)


def test_topk_mask_ties_by_index():
    s = torch.tensor([1.0, 3.0, 2.0, 3.0, 2.0, 2.0])
    assert topk_mask(s, 3).tolist() == [False, True, True, True, False, False]
    assert topk_mask(s, 0).sum() == 0 and topk_mask(s, 6).all()


def test_hand_example():
    v = torch.tensor([0.5, -4.0, 3.0, -2.0, 1.0, 0.1])
    bands = make_bands(v, 2, "uniform")              # ranks: 1,2,3 | 4,0,5
    assert bands.starts == [0, 3, 6]
    assert bands.band_of.tolist() == [1, 0, 0, 0, 1, 1]
    assert bands.sorted_abs.tolist() == [4.0, 3.0, 2.0, 1.0, 0.5, pytest.approx(0.1)]
    # w = (0.2, 1): keys 0.5, 0.8, 0.6, 0.4, 1.0, 0.1 -> top 3 = entries 4, 1, 2
    w = [0.2, 1.0]
    m = candidate_mask(v, bands, w, 0.5)
    assert m.tolist() == [False, True, True, False, True, False]
    assert band_counts(bands, w, 3) == [2, 1]
    base = torch.full((6,), 10.0)
    out = build_candidate(v, bands, w, 0.5, base=base)
    w32 = torch.tensor(w)
    assert torch.equal(out, base + torch.tensor([0, -4.0 * w32[0], 3.0 * w32[0], 0, 1.0, 0]))
    orig = build_candidate(v, bands, w, 0.5, kept_values="original")
    assert orig.tolist() == [0.0, -4.0, 3.0, 0.0, 1.0, 0.0]


def test_build_candidate_out_and_base():
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(1000, generator=gen)
    base = torch.randn(1000, generator=gen)
    bands = make_bands(v, 8, "focused", keep_ratio=0.1)
    w = torch.rand(8, generator=gen) * 2
    out = torch.full((1000,), float("nan"))
    res = build_candidate(v, bands, w, 0.1, base=base, out=out)
    assert res is out
    m = reference_mask(v, bands, w, 0.1)
    assert torch.equal(out, base + torch.where(m, v * w[bands.band_of.long()], torch.zeros(())))
    # r = 1 keeps everything
    all_ = build_candidate(v, bands, w, 1.0, base=base)
    assert torch.equal(all_, base + v * w[bands.band_of.long()])
    with pytest.raises(ValueError):
        build_candidate(v, bands, w, 0.1, out=v)
    with pytest.raises(ValueError):
        build_candidate(v, bands, w, 0.1, kept_values="scaled")
    with pytest.raises(ValueError):
        build_candidate(v, bands, w, 0.1, base=torch.zeros(5))


def test_band_sizes_both_schemes():
    assert band_starts(100, 4, "uniform") == [0, 25, 50, 75, 100]
    assert band_starts(10, 3, "uniform") == [0, 3, 6, 10]
    # focused: top round(3 * 0.05 * 1000) = 150 ranks split over 7 bands, the rest in the last
    s = band_starts(1000, 8, "focused", keep_ratio=0.05, focus=3.0)
    assert s[0] == 0 and s[7] == 150 and s[8] == 1000
    sizes = [s[b + 1] - s[b] for b in range(7)]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 150
    # top part covers everything -> equal bands
    assert band_starts(100, 4, "focused", keep_ratio=0.5, focus=3.0) == [0, 25, 50, 75, 100]
    assert band_starts(7, 1, "focused") == [0, 7]
    assert band_starts(3, 8, "uniform")[-1] == 3     # empty bands allowed when D < M
    v = torch.randn(1000)
    for scheme in ("uniform", "focused"):
        b = make_bands(v, 8, scheme, keep_ratio=0.05)
        assert isinstance(b, Bands) and b.num_bands == 8 and b.scheme == scheme
        assert b.band_of.dtype == torch.uint8 and b.sorted_abs.dtype == torch.float32
        counts = torch.bincount(b.band_of.long(), minlength=8).tolist()
        assert counts == b.sizes
        assert torch.equal(b.sorted_abs, torch.sort(v.abs(), descending=True).values)


def test_bad_arguments():
    v = torch.randn(10)
    for kwargs in ({"num_bands": 0}, {"num_bands": 256}, {"scheme": "svd"},
                   {"keep_ratio": 0.0}, {"keep_ratio": 1.5}, {"focus": -1.0}, {"num_bands": 2.5}):
        with pytest.raises(ValueError):
            make_bands(v, **kwargs)
    with pytest.raises(ValueError):
        make_bands(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError):
        make_bands(torch.empty(0))
    with pytest.raises(ValueError):
        make_bands(torch.randn(3, 3))
    bands = make_bands(v, 2, "uniform")
    for w in ([1.0, -0.5], [1.0], [1.0, float("nan")], [1.0, float("inf")], [1.0, 1e39]):
        with pytest.raises(ValueError):
            candidate_mask(v, bands, w, 0.5)
    for r in (0, -0.1, 1.01, float("nan"), "x"):
        with pytest.raises(ValueError):
            keep_count(10, r)
    with pytest.raises(ValueError):
        candidate_mask(torch.randn(11), bands, [1.0, 1.0], 0.5)
    assert keep_count(10, 1e-9) == 1 and keep_count(10, 1.0) == 10 and keep_count(1000, 0.05) == 50


def test_dtype_inputs_bf16_values():
    gen = torch.Generator().manual_seed(9)
    v = (torch.randn(2000, generator=gen) * 1e-3).to(torch.bfloat16)
    bands = make_bands(v, 8, "focused", keep_ratio=0.05)
    w = torch.rand(8, generator=gen) * 3
    assert torch.equal(candidate_mask(v, bands, w, 0.05), reference_mask(v, bands, w, 0.05))


def test_extreme_magnitudes_overflow_and_subnormal_products():
    gen = torch.Generator().manual_seed(0)
    for i in range(10):
        v = torch.randn(300, generator=gen) * 1e30
        v[::7] = 0.0
        bands = make_bands(v, 4, "uniform")
        w = torch.tensor([3e38, 1e10, 0.0, 1e-30])[torch.randperm(4, generator=gen)]
        for r in (0.01, 0.3, 0.9):          # products overflow to inf: ties at inf
            assert torch.equal(candidate_mask(v, bands, w, r), reference_mask(v, bands, w, r))
        v2 = torch.randn(300, generator=gen) * 1e-38
        bands2 = make_bands(v2, 4, "focused", keep_ratio=0.1)
        w2 = torch.rand(4, generator=gen) * 1e-3
        for r in (0.05, 0.5):               # subnormal products
            assert torch.equal(candidate_mask(v2, bands2, w2, r), reference_mask(v2, bands2, w2, r))


# -- the index-free make_bands against the stable-sort definition ------------------------------
def _bands_equal(a, b, *, exact_dtype=True):
    assert a.starts == b.starts and a.num_bands == b.num_bands and a.scheme == b.scheme
    assert a.band_of.dtype == torch.uint8 and torch.equal(a.band_of.cpu(), b.band_of.cpu())
    if exact_dtype:
        assert a.sorted_abs.dtype == torch.float32
    assert torch.equal(a.sorted_abs.float().cpu(), b.sorted_abs.cpu())


@pytest.mark.parametrize("chunk", [7, 1 << 20])
def test_make_bands_equals_stable_sort_reference(monkeypatch, chunk):
    from nps_pruning.core import bands as bands_mod
    monkeypatch.setattr(bands_mod, "CHUNK", chunk)
    gen = torch.Generator().manual_seed(77)
    # CHUNK = 7 runs the chunked path a few hundred times per call at D < 2500 (most of this test's
    # time): there D < 350 still spans up to 50 chunks, boundaries and remainders included
    top = 350 if chunk < 64 else 2500
    for i in range(120):
        D = int(torch.randint(1, top, (1,), generator=gen)) if i % 9 else int(torch.randint(1, 9, (1,), generator=gen))
        v = torch.randn(D, generator=gen) * float(torch.rand(1, generator=gen) * 3 + 1e-3)
        kind = i % 5
        if kind == 1:
            v = torch.round(v * 2) / 2                         # few levels: heavy ties
        elif kind == 2:
            v[torch.rand(D, generator=gen) < 0.7] = 0.0        # mostly zeros (+0.0 and -0.0)
            v[torch.rand(D, generator=gen) < 0.1] = -0.0
        elif kind == 3:
            v = torch.randint(-2, 3, (D,), generator=gen).float()
        dtype = (torch.float32, torch.bfloat16, torch.float16, torch.float64)[i % 4]
        v = v.to(dtype)
        M = (1, 2, 3, 8, 20, 255)[i % 6]                       # 20, 255: the bucketize path
        scheme = ("uniform", "focused")[i % 2]
        r = (0.05, 0.3, 0.01, 1.0)[i % 4]
        fast = bands_mod.make_bands(v, M, scheme, keep_ratio=r)
        ref = bands_mod._make_bands_reference(v, M, scheme, keep_ratio=r)
        _bands_equal(fast, ref)
        if dtype in (torch.float16, torch.bfloat16):
            compact = bands_mod.make_bands(v, M, scheme, keep_ratio=r, sorted_dtype=dtype)
            assert compact.sorted_abs.dtype == dtype
            _bands_equal(compact, ref, exact_dtype=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_make_bands_ties_exactly_at_band_boundaries(dtype):
    from nps_pruning.core.bands import _make_bands_reference
    # runs of equal magnitudes straddling every cut, in scrambled flat order, both signs
    gen = torch.Generator().manual_seed(3)
    for trial in range(20):
        levels = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.0])
        v = levels[torch.randint(0, 5, (997,), generator=gen)]
        v = v * torch.where(torch.rand(997, generator=gen) < 0.5, -1.0, 1.0)
        v = v.to(dtype)
        for M in (2, 3, 7, 8, 64):
            for scheme in ("uniform", "focused"):
                ref = _make_bands_reference(v, M, scheme, keep_ratio=0.1 + 0.02 * trial)
                _bands_equal(make_bands(v, M, scheme, keep_ratio=0.1 + 0.02 * trial), ref)
    # one value everywhere: every cut splits a single run purely by flat index
    v = torch.full((100,), -0.75, dtype=dtype)
    b = make_bands(v, 4, "uniform")
    assert b.band_of.tolist() == [i // 25 for i in range(100)]


def test_make_bands_rejects_bad_sorted_dtype_and_nonfinite_half():
    with pytest.raises(ValueError):
        make_bands(torch.randn(10), 2, sorted_dtype=torch.bfloat16)   # would round: not exact
    with pytest.raises(ValueError):
        make_bands(torch.randn(10).half(), 2, sorted_dtype=torch.bfloat16)
    for dt in (torch.float16, torch.bfloat16):
        with pytest.raises(ValueError, match="non-finite"):
            make_bands(torch.tensor([1.0, float("inf"), 2.0]).to(dt), 2)
        with pytest.raises(ValueError, match="non-finite"):
            make_bands(torch.tensor([1.0, float("nan")]).to(dt), 2)
