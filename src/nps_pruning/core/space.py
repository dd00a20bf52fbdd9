"""Search spaces of NPS: what one CMA-ES point means as a pruned task vector.

``magnitude`` — the paper's space (Eq. 2–5), exactly as :func:`~.mask.build_candidate`: one weight
w_b per magnitude-rank band; keep the k = round(r·D) entries of largest w_b·|τ|; kept entries
carry w_b·τ. Point w = 1 is plain magnitude top-k.

``hybrid`` — contains magnitude pruning and DARE as exact points (each wins in its own regime,
DAREx, DELLA). A point is (w_1..w_M, g, α, h):

* k_mag = round((1−α)·k) entries are chosen by the paper's rule with band weights w (per band a
  rank prefix, found by the exact per-band threshold of :mod:`.mask`), and carry w_b·2^g·τ
  (g: a global log2 rescale of the magnitude part, DAREx-q style);
* the other k_rand = k − k_mag entries are the first ones, in a fixed seeded random order (the
  same permutation DARE draws for that seed), that the magnitude part did not take; they carry
  2^h·(D − k_mag)/k_rand·τ (the unbiased rescale of a uniform sample of the rest, tuned by h).

So (w=1, g=0, α=0) is magnitude top-k and (α=1, h=0) is DARE(seed) bit for bit; the kept count
is exactly k. A candidate costs the exact mask at k_mag (:mod:`.mask`), a scan of the random order
for k_rand free entries and one chunked pass — no sort; beyond the bands the space holds the
seeded permutation (int32, :func:`make_hybrid_index`) and a candidate a one-byte-per-entry mask.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .bands import Bands
from .mask import _pass as _mask_pass
from .mask import _plan as _mask_plan
from .mask import _weights32, build_candidate, keep_count, reference_mask
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

    @property
    def num_entries(self) -> int:
        return self.perm.numel()


def _index_dtype(D: int) -> torch.dtype:
    return torch.int32 if D < 2 ** 31 - 1 else torch.int64


def make_hybrid_index(values: torch.Tensor, seed: int = 0) -> HybridIndex:
    """The hybrid space's index for τ = ``values`` (1-D) and the random order of ``seed``.
    Memory: the permutation itself (4 bytes per entry), drawn directly in int32 (the same
    permutation as int64 ``randperm``); no sort and no copy of τ."""
    if not isinstance(values, torch.Tensor) or values.dim() != 1:
        raise ValueError("make_hybrid_index expects a 1-D tensor (a flat task vector)")
    D = values.numel()
    for s in range(0, D, CHUNK):
        if not bool(torch.isfinite(values[s:s + CHUNK]).all()):
            raise ValueError("task vector has non-finite (NaN or inf) entries")
    perm = torch.randperm(D, generator=torch.Generator().manual_seed(int(seed)),
                          dtype=_index_dtype(D))
    return HybridIndex(perm.to(values.device), int(seed))


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


def split_params(params: Sequence[float], num_bands: int):
    """(w (M,), g, alpha, h) of a hybrid point."""
    p = np.asarray(params, dtype=np.float64).reshape(-1)
    if p.size != num_bands + 3:
        raise ValueError(f"a hybrid point has {num_bands + 3} entries (M band weights, g, alpha, "
                         f"h), got {p.size}")
    if not np.all(np.isfinite(p)):
        raise ValueError(f"hybrid point must be finite, got {p.tolist()}")
    return p[:num_bands], float(p[num_bands]), float(p[num_bands + 1]), float(p[num_bands + 2])


def hybrid_plan(values: torch.Tensor, bands: Bands, index: HybridIndex, params,
                keep_ratio: float, *, ranks: Optional[torch.Tensor] = None) -> HybridPlan:
    """Which entries a hybrid point keeps: the magnitude part as the exact mask of :mod:`.mask`
    (one chunked pass over τ), the random part as a prefix of ``index.perm``. With ``ranks`` (the
    positions of the first ranks, :func:`~.ranks.rank_positions`, at least to every band's cut) the
    magnitude part is those rank prefixes, gathered in O(k_mag) instead of a pass over τ: the same
    set, since each band keeps a rank prefix (:mod:`.mask`)."""
    M, D = bands.num_bands, bands.num_entries
    w, g, alpha, h = split_params(params, M)
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
    last_pos, rand_scale = -1, 0.0
    if k_rand > 0:
        last_pos = _scan_free(mag, index.perm, k_rand)
        rand_scale = float(np.float32((2.0 ** h) * (D - k_mag) / k_rand))
    return HybridPlan(k, k_mag, k_rand, cuts, last_pos, mag_scale, rand_scale, mag, mag_pos)


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
    fl32(w_b·2^g) | the random part's rescale."""
    code = plan.mag.view(torch.uint8)
    if plan.k_rand > 0:
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
    return out


def hybrid_reference(values: torch.Tensor, bands: Bands, params, keep_ratio: float,
                     seed: int = 0) -> torch.Tensor:
    """The hybrid candidate's definition, plainly (sorts; for tests)."""
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

    def family_stream(self, mean0):
        """Free coordinates of a second CMA-ES stream from ``mean0``; None: one family."""
        return None

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
        w1 = self._w1()
        pts = [np.concatenate([w1, [0.0, 0.0, 0.0]]),
               np.concatenate([w1, [0.0, 1.0, 0.0]]),
               np.concatenate([w1, [0.0, 0.5, 0.0]])]
        return pts + [np.concatenate([w1, [float(g), 0.0, 0.0]]) for g in self._rescales()]

    def start_labels(self) -> List[str]:
        return ["magnitude", "dare", "hybrid-0.5"] + [f"magnitude-x{2 ** g}" for g in self._rescales()]

    # the tuned rescale is a sharp optimum (MobileNetV2: ×3 0.97, ×2 0.64, ×4 0.72): generation 0
    # halves the step around the best rescale of the ×2/×4/×8 grid twice (± 0.5, then ± 0.25)
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

    def family_stream(self, mean0):
        """When the best start ``mean0`` is (rescaled) magnitude top-k, a second stream from it
        moves all but α and h (held at 0: from α = 0 half the whole space's candidates carry a
        random part rescaled by hundreds at small r, docs/findings.md); None after any other."""
        m, M = np.asarray(mean0, dtype=np.float64), self.num_bands
        if m[M + 1] != 0.0 or m[M + 2] != 0.0:
            return None
        return np.arange(self.dim) <= M

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
    """The candidate of ``params`` (already in parameter units) in ``space`` (a space or its
    name: decoding needs no bounds)."""
    if getattr(space, "name", space) == "magnitude":
        return build_candidate(values, bands, params, keep_ratio, base=base, out=out,
                               kept_values=kept_values)
    if kept_values != "weighted":
        raise ValueError("the hybrid space carries its own scales; kept_values must be 'weighted'")
    return build_hybrid(values, bands, index, params, keep_ratio, base=base, out=out)


__all__ = ["HybridIndex", "make_hybrid_index", "hybrid_plan", "build_hybrid", "hybrid_reference",
           "MagnitudeSpace", "HybridSpace", "SPACES", "SEARCH_SPACES", "make_space", "build_point", "split_params"]
