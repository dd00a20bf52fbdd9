"""Search spaces of NPS: what one CMA-ES point means as a pruned task vector.

``magnitude`` — the paper's space (Eq. 2–5), exactly as :func:`~.mask.build_candidate`: one weight
w_b per magnitude-rank band; keep the k = round(r·D) entries of largest w_b·|τ|; kept entries
carry w_b·τ. Point w = 1 is plain magnitude top-k.

``hybrid`` — a space that contains both magnitude pruning and DARE as exact points (DAREx and
DELLA show each wins in its own regime: magnitude for large task vectors, an unbiased random
subset for small, diffuse ones). A point is (w_1..w_M, g, α, h):

* k_mag = round((1−α)·k) entries are chosen by the paper's rule with band weights w (per band a
  rank prefix, found by the exact per-band threshold of :mod:`.mask`), and carry w_b·2^g·τ
  (g: a global log2 rescale of the magnitude part, DAREx-q style);
* the other k_rand = k − k_mag entries are the first ones, in a fixed seeded random order (the
  same permutation DARE draws for that seed), that the magnitude part did not take; they carry
  2^h·(D − k_mag)/k_rand·τ (the unbiased rescale of a uniform sample of the rest, tuned by h).

So (w=1, g=0, α=0) is magnitude top-k and (α=1, h=0) is DARE(seed) bit for bit. The kept count
is exactly k. Per candidate the work is the per-band threshold search (O(M log D)), a scan of the
random order until k_rand free entries are found (O(k_rand·D/(D−k_mag)) expected, on indices
computed once) and one chunked elementwise pass — no sort per candidate. The indices cost
three int32 (int64 beyond 2^31 entries) vectors of D entries, made once by
:func:`make_hybrid_index` (one stable sort).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .bands import Bands
from .mask import band_counts, build_candidate, keep_count

CHUNK = 1 << 20


# -- the hybrid space's indices -----------------------------------------------------------------
@dataclass
class HybridIndex:
    """Computed once per task vector and seed.

    * ``rank``: global magnitude rank of each flat entry (|τ| descending, ties by flat index — the
      order of :class:`Bands`);
    * ``inv_perm``: position of each entry in the seeded permutation DARE uses
      (``torch.randperm(D, generator=manual_seed(seed))``: DARE keeps ``perm[:k]``);
    * ``perm_rank``: ``rank[perm]``, the magnitude ranks in permutation order.
    """

    rank: torch.Tensor
    inv_perm: torch.Tensor
    perm_rank: torch.Tensor
    seed: int


def _index_dtype(D: int) -> torch.dtype:
    return torch.int32 if D < 2 ** 31 - 1 else torch.int64


def _inverse(perm: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """inv with inv[perm[i]] = i, in ``dt``, filled chunk by chunk."""
    inv = torch.empty(perm.numel(), dtype=dt)
    for s in range(0, perm.numel(), CHUNK):
        e = min(perm.numel(), s + CHUNK)
        inv[perm[s:e]] = torch.arange(s, e, dtype=dt)
    return inv


def make_hybrid_index(values: torch.Tensor, seed: int = 0) -> HybridIndex:
    """Indices of the hybrid space for τ = ``values`` (1-D) and the random order of ``seed``."""
    if not isinstance(values, torch.Tensor) or values.dim() != 1:
        raise ValueError("make_hybrid_index expects a 1-D tensor (a flat task vector)")
    D = values.numel()
    dt = _index_dtype(D)
    absv = values.detach().cpu().float().abs()
    if not bool(torch.isfinite(absv).all()):
        raise ValueError("task vector has non-finite (NaN or inf) entries")
    # peak memory: the one sort (|τ|, its values and int64 indices) and then the permutation;
    # the inverse maps are filled chunk by chunk (no D-long arange or int64 gather result)
    order = torch.sort(absv, descending=True, stable=True).indices
    del absv
    rank = _inverse(order, dt)
    del order
    perm = torch.randperm(D, generator=torch.Generator().manual_seed(int(seed)))
    inv_perm = _inverse(perm, dt)
    perm_rank = torch.empty(D, dtype=dt)
    for s in range(0, D, CHUNK):
        perm_rank[s:s + CHUNK] = rank[perm[s:s + CHUNK]]
    del perm
    dev = values.device
    return HybridIndex(rank.to(dev), inv_perm.to(dev), perm_rank, int(seed))


# -- the hybrid candidate -------------------------------------------------------------------------
@dataclass
class HybridPlan:
    k: int
    k_mag: int
    k_rand: int
    cuts: List[int]            # band b keeps ranks [starts[b], cuts[b]) in the magnitude part
    last_pos: int              # the random part is every free entry with inv_perm <= last_pos (-1: none)
    mag_scale: np.ndarray      # float32 (M,): fl32(w_b · 2^g)
    rand_scale: float          # float32 value: fl32(2^h · (D − k_mag) / k_rand)


def split_params(params: Sequence[float], num_bands: int):
    """(w (M,), g, alpha, h) of a hybrid point."""
    p = np.asarray(params, dtype=np.float64).reshape(-1)
    if p.size != num_bands + 3:
        raise ValueError(f"a hybrid point has {num_bands + 3} entries (M band weights, g, alpha, "
                         f"h), got {p.size}")
    if not np.all(np.isfinite(p)):
        raise ValueError(f"hybrid point must be finite, got {p.tolist()}")
    return p[:num_bands], float(p[num_bands]), float(p[num_bands + 1]), float(p[num_bands + 2])


def hybrid_plan(bands: Bands, index: HybridIndex, params, keep_ratio: float) -> HybridPlan:
    M, D = bands.num_bands, bands.num_entries
    w, g, alpha, h = split_params(params, M)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha (the random share) must be in [0, 1], got {alpha}")
    k = keep_count(D, keep_ratio)
    k_mag = min(k, max(0, int(round((1.0 - alpha) * k))))
    k_rand = k - k_mag
    counts = band_counts(bands, w, k_mag) if k_mag > 0 else [0] * M
    cuts = [int(bands.starts[b]) + int(counts[b]) for b in range(M)]
    mag_scale = (w.astype(np.float32) * np.float32(2.0 ** g)).astype(np.float32)
    if g == 0.0:
        mag_scale = w.astype(np.float32)
    last_pos, rand_scale = -1, 0.0
    if k_rand > 0:
        last_pos = _scan_free(bands, index, cuts, k_rand)
        rand_scale = float(np.float32((2.0 ** h) * (D - k_mag) / k_rand))
    return HybridPlan(k, k_mag, k_rand, cuts, last_pos, mag_scale, rand_scale)


def _scan_free(bands: Bands, index: HybridIndex, cuts: List[int], need: int) -> int:
    """Position (in permutation order) of the ``need``-th entry the magnitude part left free."""
    inner = torch.tensor(bands.starts[1:-1], dtype=torch.int64)
    cut_t = torch.tensor(cuts, dtype=torch.int64)
    pr = index.perm_rank
    D = pr.numel()
    found = 0
    step = max(1024, 2 * need)
    s = 0
    while s < D:
        e = min(D, s + step)
        r = pr[s:e].long()
        b = torch.bucketize(r, inner, right=True)
        free = r >= cut_t[b]
        c = torch.cumsum(free.to(torch.int64), 0)
        total = int(c[-1])
        if found + total >= need:
            return s + int(torch.searchsorted(c, need - found))
        found += total
        s = e
        step *= 2
    raise AssertionError("fewer free entries than requested")   # k <= D makes this impossible


def build_hybrid(values: torch.Tensor, bands: Bands, index: HybridIndex, params, keep_ratio: float, *,
                 base: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """τ̂ of a hybrid point (see the module docstring); with ``base``: base + τ̂. Writes into
    ``out`` when given. One chunked elementwise pass."""
    D = values.numel()
    if bands.num_entries != D or index.rank.numel() != D:
        raise ValueError(f"task vector has {D} entries, bands / index were made for "
                         f"{bands.num_entries} / {index.rank.numel()}")
    plan = hybrid_plan(bands, index, params, keep_ratio)
    dev = values.device
    if out is None:
        out = torch.empty(D, dtype=base.dtype if base is not None else torch.float32, device=dev)
    cut_t = torch.tensor(plan.cuts, dtype=index.rank.dtype, device=dev)
    mag_t = torch.from_numpy(plan.mag_scale).to(dev)
    rs = torch.tensor(plan.rand_scale, dtype=torch.float32, device=dev)
    zero = torch.zeros((), dtype=torch.float32, device=dev)
    for s in range(0, D, CHUNK):
        e = min(D, s + CHUNK)
        tc = values[s:e]
        if tc.dtype != torch.float32:
            tc = tc.float()
        b = bands.band_of[s:e].long()
        inmag = index.rank[s:e] < cut_t[b]
        scale = torch.where(inmag, mag_t[b], zero)
        if plan.k_rand > 0:
            inrand = (index.inv_perm[s:e] <= plan.last_pos) & ~inmag
            scale = torch.where(inrand, rs, scale)
        piece = tc * scale
        oc = out[s:e]
        if base is not None:
            if oc.dtype == torch.float32:
                torch.add(base[s:e].float(), piece, out=oc)
            else:
                oc.copy_(base[s:e].float() + piece)
        else:
            oc.copy_(piece)
    return out


def hybrid_reference(values: torch.Tensor, bands: Bands, params, keep_ratio: float,
                     seed: int = 0) -> torch.Tensor:
    """The hybrid candidate's definition, plainly (sorts; for tests)."""
    from .mask import reference_mask
    D = values.numel()
    M = bands.num_bands
    w, g, alpha, h = split_params(params, M)
    k = keep_count(D, keep_ratio)
    k_mag = min(k, max(0, int(round((1.0 - alpha) * k))))
    k_rand = k - k_mag
    v = values.detach().float()
    mag = (reference_mask(values, bands, w, k_mag / D) if k_mag > 0
           else torch.zeros(D, dtype=torch.bool))
    if k_mag > 0:   # keep_count(D, k_mag / D) must give back k_mag
        assert int(mag.sum()) == k_mag
    perm = torch.randperm(D, generator=torch.Generator().manual_seed(int(seed)))
    free = perm[~mag[perm]][:k_rand]
    rand = torch.zeros(D, dtype=torch.bool)
    rand[free] = True
    out = torch.zeros(D, dtype=torch.float32)
    wb = torch.from_numpy(w.astype(np.float32))[bands.band_of.long()]
    if g != 0.0:
        wb = torch.from_numpy((w.astype(np.float32) * np.float32(2.0 ** g)).astype(np.float32))[bands.band_of.long()]
    out[mag] = v[mag] * wb[mag]
    if k_rand > 0:
        out[rand] = v[rand] * torch.tensor(float(np.float32((2.0 ** h) * (D - k_mag) / k_rand)))
    return out


# -- the spaces as the search sees them -------------------------------------------------------------
class MagnitudeSpace:
    """The paper's space: M band weights (``param="log"``: CMA-ES over log2 of them)."""

    name = "magnitude"

    def __init__(self, num_bands: int, lower: float, upper: float, param: str = "linear",
                 keep_ratio: float = 0.05):
        self.num_bands, self.lower, self.upper, self.param = int(num_bands), lower, upper, param
        self.keep_ratio = keep_ratio

    @property
    def dim(self) -> int:
        return self.num_bands

    def bounds(self) -> np.ndarray:
        lo, hi = ((math.log2(self.lower), math.log2(self.upper)) if self.param == "log"
                  else (self.lower, self.upper))
        return np.tile(np.array([[lo, hi]], dtype=np.float64), (self.dim, 1))

    def to_params(self, x) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        return np.exp2(x) if self.param == "log" else x.copy()

    def start_points(self) -> List[np.ndarray]:
        """Generation 0 (in search coordinates): w = 1, plain magnitude top-k."""
        return [np.zeros(self.dim) if self.param == "log" else np.ones(self.dim)]

    def start_labels(self) -> List[str]:
        return ["magnitude"]

    refine_rounds = 0

    def refine(self, points, scores, round_: int):
        """More generation-0 points after the start points were scored: none in the paper's space."""
        return [], []

    def mean0(self, scored, points=None) -> np.ndarray:
        """CMA-ES starts at w = 1 (the paper), whatever generation 0 scored."""
        b = self.bounds()
        return np.clip(self.start_points()[0], b[:, 0], b[:, 1])

    def step_scales(self) -> np.ndarray:
        return np.ones(self.dim)

    def describe(self, params) -> Dict[str, object]:
        return {"band_weights": [float(v) for v in params]}


class HybridSpace(MagnitudeSpace):
    """Band weights (as :class:`MagnitudeSpace`) + g (log2 rescale of the magnitude part, in
    [−1, log2(1/r)]) + α (random share, [0, 1]) + h (log2 correction of the random part's
    unbiased rescale, [−1, 1])."""

    name = "hybrid"

    @property
    def dim(self) -> int:
        return self.num_bands + 3

    def _extra_bounds(self) -> np.ndarray:
        g_hi = max(1.0, math.log2(1.0 / self.keep_ratio))
        return np.array([[-1.0, g_hi], [0.0, 1.0], [-1.0, 1.0]], dtype=np.float64)

    def bounds(self) -> np.ndarray:
        head = MagnitudeSpace.bounds(self)[: self.num_bands]
        return np.vstack([head, self._extra_bounds()])

    def to_params(self, x) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        M = self.num_bands
        head = np.exp2(x[:M]) if self.param == "log" else x[:M].copy()
        return np.concatenate([head, x[M:]])

    def _rescales(self) -> List[int]:
        """The magnitude rescales tried at generation 0: ×2, ×4, ×8 while below 1/r."""
        g_hi = self._extra_bounds()[0, 1]
        return [g for g in (1, 2, 3) if g < g_hi]

    def start_points(self) -> List[np.ndarray]:
        """magnitude (w=1, g=0, α=0), DARE (α=1, h=0), the half-and-half hybrid (α=0.5), and
        magnitude rescaled ×2, ×4, ×8 (g = 1, 2, 3; DAREx-q's tuned rescale, on a grid)."""
        w1 = np.zeros(self.num_bands) if self.param == "log" else np.ones(self.num_bands)
        pts = [np.concatenate([w1, [0.0, 0.0, 0.0]]),
               np.concatenate([w1, [0.0, 1.0, 0.0]]),
               np.concatenate([w1, [0.0, 0.5, 0.0]])]
        return pts + [np.concatenate([w1, [float(g), 0.0, 0.0]]) for g in self._rescales()]

    def start_labels(self) -> List[str]:
        return ["magnitude", "dare", "hybrid-0.5"] + [f"magnitude-x{2 ** g}" for g in self._rescales()]

    # the tuned rescale of the magnitude part is a sharp optimum (on the MobileNetV2 suite ×3
    # scores 0.97 where ×2 and ×4 score 0.64 and 0.72): after the ×2/×4/×8 grid, generation 0
    # halves the step around the best rescale twice (g* ± 0.5, then ± 0.25)
    refine_rounds = 2

    def _w1(self) -> np.ndarray:
        return np.zeros(self.num_bands) if self.param == "log" else np.ones(self.num_bands)

    def refine(self, points, scores, round_: int):
        """(points, labels) to score next in generation 0: g* ± 0.5 / 2^round_ on the line of
        rescaled magnitude top-k (w = 1, α = 0, h = 0) around its best scored g*, inside the box
        and not scored yet."""
        M, w1 = self.num_bands, self._w1()
        line = [(float(p[M]), s) for p, s in zip(points, scores)
                if s is not None and np.array_equal(p[:M], w1) and p[M + 1] == 0.0 and p[M + 2] == 0.0]
        if not line:
            return [], []
        g_best = max(line, key=lambda t: t[1])[0]          # max keeps the earliest of ties
        lo, hi = self._extra_bounds()[0]
        seen = {round(g, 9) for g, _ in line}
        step = 0.5 / 2 ** round_
        out, labels = [], []
        for g in (g_best - step, g_best + step):
            if max(0.0, lo) <= g <= hi and round(g, 9) not in seen:
                out.append(np.concatenate([w1, [g, 0.0, 0.0]]))
                labels.append(f"magnitude-x{2.0 ** g:.3g}")
        return out, labels

    def mean0(self, scored, points=None) -> np.ndarray:
        """CMA-ES starts at the best scored generation-0 point (the earliest on ties), pulled
        inside the box; ``points`` default: the start points."""
        pts = list(points) if points is not None else self.start_points()
        best = 0
        for i, s in enumerate(scored):
            if s is not None and (scored[best] is None or s > scored[best]):
                best = i
        b = self.bounds()
        return np.clip(pts[best], b[:, 0], b[:, 1])

    def step_scales(self) -> np.ndarray:
        """Per-dimension initial step, relative to σ0 (σ0 is in band-weight units): g moves in
        log2 units, α in shares."""
        return np.concatenate([np.ones(self.num_bands), [2.0, 1.0, 1.0]])

    def describe(self, params) -> Dict[str, object]:
        w, g, a, h = split_params(params, self.num_bands)
        return {"band_weights": [float(v) for v in w], "log2_scale": g, "random_share": a,
                "log2_random_rescale": h}


SPACES = {"magnitude": MagnitudeSpace, "hybrid": HybridSpace}


SEARCH_SPACES = (*SPACES, "joint")   # the names SearchSettings.space accepts (joint: .joint_space)


def make_space(name: str, num_bands: int, lower: float, upper: float, param: str = "linear",
               keep_ratio: float = 0.05):
    if name not in SPACES:
        raise ValueError(f"unknown search space {name!r} (choose from {', '.join(SPACES)})")
    return SPACES[name](num_bands, lower, upper, param, keep_ratio)


def build_point(space, values, bands, index, params, keep_ratio, *, base=None, out=None,
                kept_values="weighted"):
    """The candidate of ``params`` (already in parameter units) in ``space``."""
    if space.name == "magnitude":
        return build_candidate(values, bands, params, keep_ratio, base=base, out=out,
                               kept_values=kept_values)
    if kept_values != "weighted":
        raise ValueError("the hybrid space carries its own scales; kept_values must be 'weighted'")
    return build_hybrid(values, bands, index, params, keep_ratio, base=base, out=out)


__all__ = ["HybridIndex", "make_hybrid_index", "hybrid_plan", "build_hybrid", "hybrid_reference",
           "MagnitudeSpace", "HybridSpace", "SPACES", "SEARCH_SPACES", "make_space", "build_point", "split_params"]
