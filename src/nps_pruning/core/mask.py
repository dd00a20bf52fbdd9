"""The candidate mask of NPS (SPEC §1): exact, without a sort or top-k over D per candidate.

Definition (``reference_mask``): for band weights w, every entry d gets the key
``key_d = fl32(w[band_d] · |τ_d|)`` (float32 product, exactly as computed here); the mask keeps
the k = ``keep_count(D, r)`` entries of largest key, ties broken by global rank ascending (rank =
position in the |τ| order of :class:`~nps_pruning.core.bands.Bands`: descending, ties by flat
index).

Fast path (``band_counts`` / ``candidate_mask`` / ``build_candidate``): float32 rounding is
monotone, so inside a band keys are non-increasing along rank and the kept entries of band b are
a rank-prefix of some length n_b. The k-th largest key v* is found by bisection over float32 bit
patterns (non-negative floats order like their integer bits); each step counts, for all M bands at
once, the prefix with key >= v by a vectorised binary search in ``sorted_abs`` (tiny numpy ops,
O(M log D) each). Kept = every key > v*, plus keys == v* in rank order (band by band) up to k —
at most one band is cut inside its run of v*-ties, and there ranks are resolved as |τ| descending
then flat index. The mask/candidate is then one chunked elementwise pass over τ: a uint8 -> float
lookup of w, one multiply, and a ``hardshrink`` at v* (|w·τ| > v* keeps), plus a small fix-up of
the entries whose key equals v* when those ties are only partly kept.

Compact τ: ``values`` may be float16 / bfloat16 (``load_task_vector(dtype=...)``). Keys are always
computed in float32 from the 16-bit values (widening is exact), so the mask is that of the float32
vector holding the same values; kept values are ``fl32(w·τ)``. ``bands.sorted_abs`` may then be
16-bit too (``make_bands(sorted_dtype=...)``): the threshold search widens the few entries it reads.

Devices: ``values``, ``bands.band_of``, ``base`` and ``out`` must share one device (a CUDA device
included): the elementwise pass runs there. The threshold search always runs on the CPU over
``bands.sorted_abs``, which ``make_bands`` keeps in host memory: a candidate reads O(M·log D·32)
of its entries, so a device copy would only cost accelerator memory and a sync per read.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch

from .bands import Bands

CHUNK = 1 << 18          # entries per elementwise chunk: ~1 MiB float32 temporaries, cache friendly
CHUNK_DEVICE = 1 << 24   # ... on an accelerator: fewer, larger kernels (~320 MiB of temporaries)
_INF_BITS = 0x7F800000   # bit pattern of float32 +inf
KEPT_VALUES = ("weighted", "original")


# -- small helpers ----------------------------------------------------------------------------
def keep_count(num_entries: int, keep_ratio: float) -> int:
    """k = round(r·D), at least 1 (Python's round). ValueError unless 0 < r <= 1 and D >= 1."""
    try:
        r = float(keep_ratio)
    except (TypeError, ValueError):
        raise ValueError(f"keep ratio must be a number, got {keep_ratio!r}") from None
    if not 0.0 < r <= 1.0:
        raise ValueError(f"keep ratio must be in (0, 1], got {keep_ratio}")
    D = int(num_entries)
    if D < 1:
        raise ValueError(f"cannot keep entries of an empty vector (D = {num_entries})")
    return min(D, max(1, int(round(r * D))))


def _f32(bits: int) -> np.float32:
    return np.array([bits], dtype=np.uint32).view(np.float32)[0]


def _weights32(bands: Bands, weights) -> np.ndarray:
    """Band weights as a float32 numpy array of length M; ValueError if wrong/negative/non-finite."""
    if isinstance(weights, torch.Tensor):
        arr = weights.detach().cpu().double().numpy()
    else:
        arr = np.asarray(weights, dtype=np.float64)
    arr = arr.reshape(-1)
    if arr.size != bands.num_bands:
        raise ValueError(f"got {arr.size} band weights for {bands.num_bands} bands")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"band weights must be finite, got {arr.tolist()}")
    if np.any(arr < 0):
        raise ValueError(f"band weights must be >= 0, got {arr.tolist()}")
    if np.any(arr > np.finfo(np.float32).max):
        raise ValueError(f"band weights overflow float32: {arr.tolist()}")
    return arr.astype(np.float32)


class _Widened:
    """Read access to a non-float32 or off-CPU ``sorted_abs`` as float32 numpy values (only the
    O(M log D) entries the threshold search touches are converted / copied)."""

    def __init__(self, t: torch.Tensor):
        self.t = t
        self.raw = None
        if t.device.type == "cpu":
            if t.dtype == torch.float16:
                self.raw = t.contiguous().numpy()
            elif t.dtype == torch.bfloat16:
                self.raw = t.contiguous().view(torch.int16).numpy().view(np.uint16)

    def __len__(self) -> int:
        return self.t.numel()

    def __getitem__(self, idx):
        if self.raw is None:           # another device (or dtype): gather those few entries
            r = self.t[torch.as_tensor(np.asarray(idx, dtype=np.int64))].float().cpu().numpy()
        elif self.raw.dtype == np.float16:
            r = np.asarray(self.raw[idx]).astype(np.float32)
        else:                          # bfloat16 -> float32 is a 16-bit shift, exactly
            r = (np.asarray(self.raw[idx]).astype(np.uint32) << np.uint32(16)).view(np.float32)
        return r if r.ndim else r[()]


def _sorted_np(bands: Bands):
    """``sorted_abs`` as something numpy-indexable giving float32 values. float32 on the CPU (the
    usual case): the numpy view itself; float16 / bfloat16 (``make_bands(sorted_dtype=...)``) or a
    tensor on another device: a wrapper that widens / copies only the entries it is asked for."""
    sa = bands.sorted_abs
    if sa.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"bands.sorted_abs must be float32, float16 or bfloat16, got {sa.dtype}")
    if sa.dtype == torch.float32 and sa.device.type == "cpu":
        return sa.detach().contiguous().numpy()
    return _Widened(sa.detach())


# -- the exact per-band counts ----------------------------------------------------------------
@dataclass
class _Plan:
    k: int
    counts: List[int]          # n_b
    lam: float                 # keep iff key > lam (strictly), apart from the v*-ties below
    vstar: float               # the k-th largest key
    tie_fix: bool              # some keys == v* are kept, some not: a fix-up is needed
    tie_full: List[bool]       # per band: all its v*-ties are kept
    partial_band: int          # band whose v*-ties are cut (-1: none)
    partial_t: float           # in that band: keep |τ| > t, and |τ| == t for the first ...
    partial_quota: int         # ... this many such entries by flat index


def _count_ge(sa, starts, w, v, lo, hi):
    """Per band, the length of the prefix with fl32(w_b·sa) >= v, known to lie in [lo, hi]."""
    lo = lo.copy()
    hi = hi.copy()
    last = len(sa) - 1
    for _ in range(int((hi - lo).max(initial=0)).bit_length()):
        active = lo < hi
        if not active.any():
            break
        mid = (lo + hi) >> 1
        p = w * sa[np.minimum(starts + mid, last)]
        ok = p >= v
        lo = np.where(active & ok, mid + 1, lo)
        hi = np.where(active & ~ok, mid, hi)
    return lo


def _plan(bands: Bands, weights, k: int) -> _Plan:
    with np.errstate(over="ignore", under="ignore"):   # products may overflow to inf: exact too
        return _plan_impl(bands, weights, k)


def _plan_impl(bands: Bands, weights, k: int) -> _Plan:
    M = bands.num_bands
    D = bands.num_entries
    if len(bands.starts) != M + 1 or bands.sorted_abs.numel() != D:
        raise ValueError("inconsistent Bands (starts / sorted_abs do not match)")
    k = int(k)
    if not 0 <= k <= D:
        raise ValueError(f"k must be in [0, {D}], got {k}")
    w = _weights32(bands, weights)
    all_starts = np.asarray(bands.starts, dtype=np.int64)
    starts, lens = all_starts[:-1], np.diff(all_starts)
    if k == 0:
        return _Plan(0, [0] * M, math.inf, math.inf, False, [False] * M, -1, 0.0, 0)
    if k == D:
        return _Plan(D, lens.tolist(), -1.0, 0.0, False, [True] * M, -1, 0.0, 0)
    sa = _sorted_np(bands)
    # invariant: count_ge(f(lo_bits)) >= k > count_ge(f(hi_bits)); ge_lo / ge_hi are those counts.
    lo_bits, hi_bits = 0, _INF_BITS + 1
    ge_lo, ge_hi = lens.copy(), np.zeros(M, dtype=np.int64)
    # tighten the top: the largest key overall
    nonempty = lens > 0
    top = (w[nonempty] * sa[starts[nonempty]]).max()
    top_bits = int(np.array([top], dtype=np.float32).view(np.uint32)[0])
    if top_bits + 1 < hi_bits:
        hi_bits = top_bits + 1   # nothing is > top
    while hi_bits - lo_bits > 1:
        mid = (lo_bits + hi_bits) >> 1
        c = _count_ge(sa, starts, w, _f32(mid), ge_hi, ge_lo)
        if int(c.sum()) >= k:
            lo_bits, ge_lo = mid, c
        else:
            hi_bits, ge_hi = mid, c
    vstar = float(_f32(lo_bits))
    ge, gt = ge_lo, ge_hi             # counts of keys >= v* and > v*
    rest = k - int(gt.sum())
    counts, tie_full = [], []
    partial_band, partial_t, partial_quota = -1, 0.0, 0
    for b in range(M):
        ties = int(ge[b] - gt[b])
        q = min(rest, ties)
        rest -= q
        counts.append(int(gt[b]) + q)
        tie_full.append(ties > 0 and q == ties)
        if 0 < q < ties:
            partial_band = b
            s, n = int(starts[b]), int(gt[b]) + q
            t = sa[s + n - 1]
            # first position of value t inside the kept prefix of band b (sa is descending)
            lo_i, hi_i = s, s + n - 1
            while lo_i < hi_i:
                m = (lo_i + hi_i) >> 1
                if sa[m] > t:
                    lo_i = m + 1
                else:
                    hi_i = m
            partial_t, partial_quota = float(t), s + n - lo_i
    assert rest == 0 and sum(counts) == k
    if int(ge.sum()) == k:           # every v*-tie kept: keep key >= v*
        lam = float(np.nextafter(np.float32(vstar), np.float32(-1))) if vstar > 0 else -1.0
        return _Plan(k, counts, lam, vstar, False, tie_full, -1, 0.0, 0)
    return _Plan(k, counts, vstar, vstar, True, tie_full, partial_band, partial_t, partial_quota)


def band_counts(bands: Bands, weights, k: int) -> List[int]:
    """n_b: how many entries of each band the candidate with ``weights`` keeps (each a rank-prefix
    of its band), summing to k. O(M·log D·32) tiny operations; no pass over D."""
    return _plan(bands, weights, k).counts


# -- the elementwise pass -----------------------------------------------------------------------
def _check_values(values: torch.Tensor, bands: Bands) -> None:
    if not isinstance(values, torch.Tensor) or values.dim() != 1:
        raise ValueError("expected a 1-D tensor (a flat task vector)")
    if values.numel() != bands.num_entries or bands.band_of.numel() != values.numel():
        raise ValueError(f"task vector has {values.numel()} entries, bands were made for "
                         f"{bands.num_entries}")
    if bands.band_of.device != values.device:
        raise ValueError(f"bands.band_of is on {bands.band_of.device} but the task vector on "
                         f"{values.device}; move band_of with the task vector "
                         "(sorted_abs may stay on the CPU)")


def _fix_ties(plan: _Plan, key: torch.Tensor, band_c: torch.Tensor, absf, running: List[int]):
    """Flat positions (within the chunk) of the v*-ties that are kept. ``absf(idx)`` gives |τ| there;
    ``running`` is the number of partial-band |τ|==t entries seen in earlier chunks."""
    idx = torch.nonzero(key == plan.vstar).squeeze(1)
    if idx.numel() == 0:
        return idx
    b = band_c[idx].long()
    full = getattr(plan, "_full_t", None)
    if full is None or full.device != key.device:
        full = plan._full_t = torch.tensor(plan.tie_full, dtype=torch.bool, device=key.device)
    keep = full[b]
    if plan.partial_band >= 0:
        inb = b == plan.partial_band
        if bool(inb.any()):
            pidx = idx[inb]
            a = absf(pidx)
            eq = a == plan.partial_t
            order = torch.cumsum(eq.to(torch.int64), 0) + running[0]
            running[0] += int(eq.sum())
            keep[inb] = (a > plan.partial_t) | (eq & (order <= plan.partial_quota))
    return idx[keep]


def _pass(values, bands, plan: _Plan, weights32: np.ndarray, mode: str, base=None, out=None):
    """mode 'mask' -> bool mask; 'weighted' / 'original' -> (base +) masked candidate values."""
    D = values.numel()
    dev = values.device
    wtab = torch.from_numpy(weights32).to(dev)
    if mode == "mask":
        result = torch.zeros(D, dtype=torch.bool, device=dev) if out is None else out
    else:
        if out is None:
            dtype = base.dtype if base is not None else torch.float32
            result = torch.empty(D, dtype=dtype, device=dev)
        else:
            result = out
    if plan.k == 0 and mode == "mask":
        result.zero_()
        return result
    C = min(CHUNK if dev.type == "cpu" else CHUNK_DEVICE, D)
    lb = torch.empty(C, dtype=torch.int64, device=dev)
    wv = torch.empty(C, dtype=torch.float32, device=dev)
    kv = torch.empty(C, dtype=torch.float32, device=dev)
    rv = torch.empty(C, dtype=torch.float32, device=dev)
    running = [0]
    band_of = bands.band_of
    for s in range(0, D, C):
        e = min(D, s + C)
        n = e - s
        tc = values[s:e]
        if tc.dtype != torch.float32:
            tc = tc.float()
        bc = band_of[s:e]
        lbn, wvn, kvn, rvn = lb[:n], wv[:n], kv[:n], rv[:n]
        lbn.copy_(bc)
        torch.index_select(wtab, 0, lbn, out=wvn)          # w[band] (float32)
        torch.mul(tc, wvn, out=kvn)                        # fl32(w·τ); |.| == fl32(w·|τ|)
        if mode == "mask":
            mc = result[s:e]
            torch.abs(kvn, out=rvn)
            torch.gt(rvn, plan.lam, out=mc)
            if plan.tie_fix:
                kept = _fix_ties(plan, rvn, bc, lambda i: tc[i].abs(), running)
                mc[kept] = True
            continue
        if mode == "weighted":
            torch.hardshrink(kvn, plan.lam, out=rvn)       # keeps |w·τ| > lam, else 0
            if plan.tie_fix:
                kept = _fix_ties(plan, kvn.abs(), bc, lambda i: tc[i].abs(), running)
                rvn[kept] = kvn[kept]
        else:  # original values
            torch.abs(kvn, out=rvn)
            m = rvn > plan.lam
            if plan.tie_fix:
                kept = _fix_ties(plan, rvn, bc, lambda i: tc[i].abs(), running)
                m[kept] = True
            torch.mul(tc, m, out=rvn)
        oc = result[s:e]
        if base is not None:
            torch.add(base[s:e], rvn, out=oc) if oc.dtype == torch.float32 else \
                oc.copy_(base[s:e].float() + rvn)
        else:
            oc.copy_(rvn)
    return result


def candidate_mask(values: torch.Tensor, bands: Bands, weights, keep_ratio: float) -> torch.Tensor:
    """The exact NPS mask (bool, (D,)): same set as :func:`reference_mask`, without a sort."""
    _check_values(values, bands)
    k = keep_count(values.numel(), keep_ratio)
    plan = _plan(bands, weights, k)
    return _pass(values, bands, plan, _weights32(bands, weights), "mask")


def build_candidate(values: torch.Tensor, bands: Bands, weights, keep_ratio: float, *,
                    base: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
                    kept_values: str = "weighted") -> torch.Tensor:
    """τ̂(w) = mask ⊙ (w[band]·τ) (``kept_values="original"``: mask ⊙ τ); with ``base``:
    base + τ̂(w). Writes into ``out`` when given (e.g. a model's bound flat buffer; must not be
    ``values``) and returns it. One chunked elementwise pass; temporaries are O(chunk), not O(D)."""
    _check_values(values, bands)
    if kept_values not in KEPT_VALUES:
        raise ValueError(f"kept_values must be one of {KEPT_VALUES}, got {kept_values!r}")
    D = values.numel()
    for name, t in (("base", base), ("out", out)):
        if t is not None and (not isinstance(t, torch.Tensor) or t.numel() != D or t.dim() != 1):
            raise ValueError(f"{name} must be a 1-D tensor with {D} entries")
    if out is not None and (out is values or out.data_ptr() == values.data_ptr()):
        raise ValueError("out must not alias values")
    if out is not None and not out.is_floating_point():
        raise ValueError(f"out must be a floating-point tensor, got {out.dtype}")
    for name, t in (("base", base), ("out", out)):
        if t is not None and t.device != values.device:
            raise ValueError(f"{name} is on {t.device} but the task vector on {values.device}")
    k = keep_count(D, keep_ratio)
    plan = _plan(bands, weights, k)
    return _pass(values, bands, plan, _weights32(bands, weights), kept_values, base=base, out=out)


# -- the definitions (slow, plain) --------------------------------------------------------------
def _kth_smallest(scores: torch.Tensor, j: int) -> torch.Tensor:
    """The j-th smallest of a 1-D tensor (1-based), as a 0-dim tensor of its dtype. On the CPU for
    float32/float64 by numpy's in-place introselect on one copy (``torch.kthvalue`` also holds an
    int64 index per entry: 3× the memory of the scores); the same value exactly."""
    if scores.device.type == "cpu" and scores.dtype in (torch.float32, torch.float64):
        a = scores.detach().numpy().copy()
        a.partition(j - 1)
        return torch.tensor(a[j - 1], dtype=scores.dtype)
    return torch.kthvalue(scores, j).values


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k largest ``scores`` (1-D), ties broken by flat index ascending.
    O(D) (a kthvalue, not a full sort)."""
    D = scores.numel()
    k = int(k)
    if not 0 <= k <= D:
        raise ValueError(f"k must be in [0, {D}], got {k}")
    if k == 0:
        return torch.zeros(D, dtype=torch.bool, device=scores.device)
    if k == D:
        return torch.ones(D, dtype=torch.bool, device=scores.device)
    v = _kth_smallest(scores, D - k + 1)            # the k-th largest
    mask = scores > v
    need = k - int(mask.sum())
    if need > 0:
        ties = torch.nonzero(scores == v).squeeze(1)[:need]
        mask[ties] = True
    return mask


def reference_mask(values: torch.Tensor, bands: Bands, weights, keep_ratio: float) -> torch.Tensor:
    """The definition of the NPS mask, implemented plainly with stable sorts (O(D log D)):
    key_d = fl32(w[band_d]·|τ_d|); keep the k largest keys, ties by global |τ| rank ascending."""
    _check_values(values, bands)
    k = keep_count(values.numel(), keep_ratio)
    w = torch.from_numpy(_weights32(bands, weights)).to(values.device)
    absv = values.detach().float().abs()
    key = w[bands.band_of.long()] * absv
    rank_order = torch.sort(absv, descending=True, stable=True).indices   # position -> flat index
    by_key = torch.sort(key[rank_order], descending=True, stable=True).indices[:k]
    mask = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    mask[rank_order[by_key]] = True
    return mask


__all__ = ["keep_count", "band_counts", "candidate_mask", "build_candidate", "reference_mask",
           "topk_mask", "CHUNK"]
