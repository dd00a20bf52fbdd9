"""The hybrid space's candidate: which entries a point (w_1..w_M, g, α, h, β) keeps, and their values.

* k_mag = round((1−α)·k) entries are chosen by the paper's rule with band weights w (per band a
  rank prefix, found by the exact per-band threshold of :mod:`.mask`), and carry w_b·2^g·τ
  (g: a global log2 rescale of the magnitude part, DAREx-q style);
* the other k_rand = k − k_mag entries are a random sample of the entries the magnitude part did
  not take. With β = 0 it is uniform: the first free ones in a fixed seeded random order (the same
  permutation DARE draws for that seed), carrying 2^h·(D − k_mag)/k_rand·τ (the unbiased rescale
  of a uniform sample of the rest, tuned by h). With β > 0 it prefers large entries: sampling
  without replacement with probability ∝ u_j^β (u_j: entry j's magnitude rank in (0, 1]),
  each kept entry rescaled by 2^h / π_j, its inclusion probability (:mod:`.rank_sample`).

So (w=1, g=0, α=0) is magnitude top-k and (α=1, h=0, β=0) is DARE(seed) bit for bit; the kept
count is exactly k. A point of M + 3 entries (written before β existed) has β = 0. A β = 0
candidate costs the exact mask at k_mag (:mod:`.mask`), a scan of the random order for k_rand free
entries and one chunked pass — no sort; beyond the bands the space holds the seeded permutation
(int32, :func:`make_hybrid_index`) and a candidate a one-byte-per-entry mask. A β > 0 candidate
adds a D-long key and a small sort (:mod:`.rank_sample`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np
import torch

from ..dtypes import all_finite
from .bands import Bands
from .mask import _pass as _mask_pass
from .mask import _plan as _mask_plan
from .mask import _weights32, keep_count, reference_mask
from .rank_sample import RankKeys, log_exponentials, log_ranks, rank_sample, rank_sample_reference
from .sparsify import random_order
from .ranks import rank_prefixes

CHUNK = 1 << 20


# -- the hybrid space's index ------------------------------------------------------------------
@dataclass
class HybridIndex:
    """Computed once per task vector and seed: ``perm``, the seeded random order DARE uses
    (``torch.randperm(D, generator=manual_seed(seed))``: DARE keeps ``perm[:k]``), as int32
    (int64 beyond 2^31 entries) on the task vector's device. The only D-long structure the hybrid
    space adds to the bands: the magnitude part is found from the bands alone (:mod:`.mask`)."""

    perm: torch.Tensor
    seed: int
    _rank_keys: Optional[RankKeys] = field(default=None, init=False, repr=False)

    @property
    def num_entries(self) -> int:
        return self.perm.numel()

    def rank_keys(self, values: torch.Tensor) -> RankKeys:
        """log E and log u of :mod:`.rank_sample` for τ = ``values``, found on the first β > 0
        candidate and kept (8 bytes an entry, on ``values``' device; its prefixes at most 6 more)."""
        if self._rank_keys is None:
            self._rank_keys = RankKeys(log_exponentials(self.num_entries, self.seed).to(values.device),
                                       log_ranks(values))
        return self._rank_keys


def make_hybrid_index(values: torch.Tensor, seed: int = 0) -> HybridIndex:
    """The hybrid space's index for τ = ``values`` (1-D) and the random order of ``seed``.
    Memory: the permutation itself (4 bytes per entry), drawn directly in int32 (the same
    permutation as int64 ``randperm``); no sort and no copy of τ."""
    if not isinstance(values, torch.Tensor) or values.dim() != 1:
        raise ValueError("make_hybrid_index expects a 1-D tensor (a flat task vector)")
    D = values.numel()
    if not all_finite(values):
        raise ValueError("task vector has non-finite (NaN or inf) entries")
    return HybridIndex(random_order(D, seed).to(values.device), int(seed))


# -- the hybrid candidate -------------------------------------------------------------------------
@dataclass
class HybridPlan:
    k: int
    k_mag: int
    k_rand: int
    cuts: List[int]            # band b keeps ranks [starts[b], cuts[b]) in the magnitude part
    last_pos: int              # the random part: the free entries among perm[:last_pos + 1] (-1: none)
    mag_scale: np.ndarray      # float32 (M,): fl32(w_b · 2^g)
    rand_scale: float          # float32 value: fl32(2^h · (D − k_mag) / k_rand)
    mag: torch.Tensor          # bool (D,): the magnitude part (the paper's mask of w at k_mag)
    mag_pos: Optional[torch.Tensor] = None   # (k_mag,) its positions, band by band in rank
    #                                          order (only when hybrid_plan was given the ranks)
    rand_idx: Optional[torch.Tensor] = None  # β > 0: the random part's positions (ascending) and
    rand_vals: Optional[torch.Tensor] = None  # their float32 values (last_pos −1, rand_scale 0)


def split_params(params: Sequence[float], num_bands: int):
    """(w (M,), g, alpha, h, beta) of a hybrid point; a point of M + 3 entries has β = 0."""
    p = np.asarray(params, dtype=np.float64).reshape(-1)
    if p.size not in (num_bands + 3, num_bands + 4):
        raise ValueError(f"a hybrid point has {num_bands + 4} entries (M band weights, g, alpha, "
                         f"h, beta; or M + 3 without beta), got {p.size}")
    if not np.all(np.isfinite(p)):
        raise ValueError(f"hybrid point must be finite, got {p.tolist()}")
    beta = float(p[num_bands + 3]) if p.size == num_bands + 4 else 0.0
    if beta < 0.0:
        raise ValueError(f"beta (the random part's rank power) must be >= 0, got {beta}")
    return (p[:num_bands], float(p[num_bands]), float(p[num_bands + 1]), float(p[num_bands + 2]),
            beta)


def hybrid_plan(values: torch.Tensor, bands: Bands, index: HybridIndex, params,
                keep_ratio: float, *, ranks: Optional[torch.Tensor] = None) -> HybridPlan:
    """Which entries a hybrid point keeps: the magnitude part as the exact mask of :mod:`.mask`
    (one chunked pass over τ), the random part as a prefix of ``index.perm``. With ``ranks`` (the
    positions of the first ranks, :func:`~.ranks.rank_positions`, at least to every band's cut) the
    magnitude part is those rank prefixes, gathered in O(k_mag) instead of a pass over τ: the same
    set, since each band keeps a rank prefix (:mod:`.mask`)."""
    M, D = bands.num_bands, bands.num_entries
    w, g, alpha, h, beta = split_params(params, M)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha (the random share) must be in [0, 1], got {alpha}")
    k = keep_count(D, keep_ratio)
    k_mag = min(k, max(0, int(round((1.0 - alpha) * k))))
    k_rand = k - k_mag
    mag_pos = None
    if k_mag > 0:
        mplan = _mask_plan(bands, w, k_mag)
        counts = mplan.counts
        if ranks is not None:
            mag_pos = rank_prefixes(ranks, bands, counts)
            mag = torch.zeros(D, dtype=torch.bool, device=values.device)
            mag[mag_pos] = True
        else:
            mag = _mask_pass(values, bands, mplan, _weights32(bands, w), "mask")
    else:
        counts, mag = [0] * M, torch.zeros(D, dtype=torch.bool, device=values.device)
        if ranks is not None:
            mag_pos = ranks[:0]
    cuts = [int(bands.starts[b]) + int(counts[b]) for b in range(M)]
    mag_scale = (w.astype(np.float32) * np.float32(2.0 ** g)).astype(np.float32)
    if g == 0.0:
        mag_scale = w.astype(np.float32)
    last_pos, rand_scale, rand_idx, rand_vals = -1, 0.0, None, None
    if k_rand > 0 and beta > 0.0:
        rand_idx, rand_vals = rank_sample(values, index.rank_keys(values), mag, k_rand, beta, h,
                                           index.seed, n_taken=k_mag)
    elif k_rand > 0:
        last_pos = _scan_free(mag, index.perm, k_rand)
        rand_scale = float(np.float32((2.0 ** h) * (D - k_mag) / k_rand))
    return HybridPlan(k, k_mag, k_rand, cuts, last_pos, mag_scale, rand_scale, mag, mag_pos,
                      rand_idx, rand_vals)


def _scan_free(mag: torch.Tensor, perm: torch.Tensor, need: int) -> int:
    """Position (in permutation order) of the ``need``-th entry the magnitude part left free."""
    D = perm.numel()
    found = 0
    step = max(1024, 2 * need)
    s = 0
    while s < D:
        e = min(D, s + step)
        free = ~mag[perm[s:e]]
        c = torch.cumsum(free.to(torch.int64), 0)
        total = int(c[-1])
        if found + total >= need:
            return s + int(torch.searchsorted(c, need - found))
        found += total
        s = e
        step *= 2
    raise AssertionError("fewer free entries than requested")   # k <= D makes this impossible


def _hybrid_code(plan: HybridPlan, index: HybridIndex, M: int, dev):
    """(code, table): code_d = 1 (magnitude part), 2 (random part) or 0 (dropped), one byte an
    entry (it reuses the plan's mask); entry d's scale is table[band_d + M·code_d] = 0 |
    fl32(w_b·2^g) | the random part's rescale. A β > 0 random part is not coded (code 0): its
    entries carry their own values (``plan.rand_idx`` / ``plan.rand_vals``)."""
    code = plan.mag.view(torch.uint8)
    if plan.k_rand > 0 and plan.rand_idx is None:
        perm = index.perm
        for s in range(0, plan.last_pos + 1, CHUNK):
            sel = perm[s:min(plan.last_pos + 1, s + CHUNK)]
            c = code[sel]
            code[sel] = torch.where(c == 0, 2, c).to(torch.uint8)
    return code, _code_table(plan, M, dev)


def _code_table(plan: HybridPlan, M: int, dev) -> torch.Tensor:
    """float32 (3M,): entry d's scale is ``table[band_d + M·code_d]`` (see :func:`_hybrid_code`)."""
    return torch.cat([torch.zeros(M), torch.from_numpy(plan.mag_scale),
                      torch.full((M,), plan.rand_scale)]).to(torch.float32).to(dev)


def build_hybrid(values: torch.Tensor, bands: Bands, index: HybridIndex, params, keep_ratio: float, *,
                 base: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """τ̂ of a hybrid point (see the module docstring); with ``base``: base + τ̂. Writes into
    ``out`` when given. Temporaries: one D-long uint8 code (the magnitude mask, reused) and
    O(chunk); an elementwise pass finds the magnitude part, one more writes the candidate."""
    D = values.numel()
    if bands.num_entries != D or index.num_entries != D:
        raise ValueError(f"task vector has {D} entries, bands / index were made for "
                         f"{bands.num_entries} / {index.num_entries}")
    plan = hybrid_plan(values, bands, index, params, keep_ratio)
    dev = values.device
    M = bands.num_bands
    if out is None:
        out = torch.empty(D, dtype=base.dtype if base is not None else torch.float32, device=dev)
    code, table = _hybrid_code(plan, index, M, dev)
    for s in range(0, D, CHUNK):
        e = min(D, s + CHUNK)
        tc = values[s:e]
        if tc.dtype != torch.float32:
            tc = tc.float()
        key = bands.band_of[s:e].long()
        key.add_(code[s:e].long(), alpha=M)
        piece = tc * table[key]
        oc = out[s:e]
        if base is not None:
            if oc.dtype == torch.float32:
                torch.add(base[s:e].float(), piece, out=oc)
            else:
                oc.copy_(base[s:e].float() + piece)
        else:
            oc.copy_(piece)
    if plan.rand_idx is not None:        # β > 0: the random part's own values
        idx = plan.rand_idx
        vals = plan.rand_vals if base is None else base[idx].float() + plan.rand_vals
        out[idx] = vals.to(out.dtype)
    return out


def hybrid_reference(values: torch.Tensor, bands: Bands, params, keep_ratio: float,
                     seed: int = 0) -> torch.Tensor:
    """The hybrid candidate's definition, plainly (sorts; β > 0: O(D²) ranks; for tests)."""
    D = values.numel()
    M = bands.num_bands
    w, g, alpha, h, beta = split_params(params, M)
    k = keep_count(D, keep_ratio)
    k_mag = min(k, max(0, int(round((1.0 - alpha) * k))))
    k_rand = k - k_mag
    v = values.detach().float()
    mag = (reference_mask(values, bands, w, k_mag / D) if k_mag > 0
           else torch.zeros(D, dtype=torch.bool))
    if k_mag > 0:   # keep_count(D, k_mag / D) must give back k_mag
        assert int(mag.sum()) == k_mag
    if beta > 0.0 and k_rand > 0:
        rand_part = rank_sample_reference(values, mag, k_rand, beta, h, seed)
    perm = torch.randperm(D, generator=torch.Generator().manual_seed(int(seed)))
    free = perm[~mag[perm]][:k_rand]
    rand = torch.zeros(D, dtype=torch.bool)
    rand[free] = True
    out = torch.zeros(D, dtype=torch.float32)
    wb = torch.from_numpy(w.astype(np.float32))[bands.band_of.long()]
    if g != 0.0:
        wb = torch.from_numpy((w.astype(np.float32) * np.float32(2.0 ** g)).astype(np.float32))[bands.band_of.long()]
    out[mag] = v[mag] * wb[mag]
    if beta > 0.0 and k_rand > 0:
        return torch.where(mag, out, rand_part)
    if k_rand > 0:
        out[rand] = v[rand] * torch.tensor(float(np.float32((2.0 ** h) * (D - k_mag) / k_rand)))
    return out




__all__ = ["HybridIndex", "make_hybrid_index", "HybridPlan", "split_params", "hybrid_plan",
           "build_hybrid", "hybrid_reference"]
