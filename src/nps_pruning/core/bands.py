"""Magnitude-rank bands of a task vector (SPEC §1, the paper's "subspaces", §3.2).

All D entries of |τ| are ranked *globally* (descending; ties by flat index ascending — the
project's one total order, see ARCHITECTURE.md) and the ranks are cut into M contiguous bands.
The sort happens once, here; every candidate mask afterwards is found from ``sorted_abs`` by
per-band binary searches (``core.mask``), never by a sort over D.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import List

import torch

from ..dtypes import all_finite

SCHEMES = ("uniform", "focused")
MAX_BANDS = 255  # band_of is uint8


@dataclass
class Bands:
    """M contiguous rank bands over D entries.

    * ``starts``: band ``b`` holds global ranks ``[starts[b], starts[b+1])``; ``len == M+1``,
      ``starts[0] == 0``, ``starts[M] == D`` (a band may be empty when D < M);
    * ``band_of``: uint8 (D,), the band of each flat entry;
    * ``sorted_abs``: float32 (D,), |τ| in rank order (descending, ties by flat index); always in
      host (CPU) memory. With ``make_bands(..., sorted_dtype=τ.dtype)`` on a 16-bit τ it is that
      16-bit dtype instead (the same values exactly; half the memory).
    """

    num_bands: int
    scheme: str
    starts: List[int]
    band_of: torch.Tensor
    sorted_abs: torch.Tensor

    @property
    def num_entries(self) -> int:
        """D."""
        return int(self.starts[-1])

    @property
    def sizes(self) -> List[int]:
        """Number of entries in each band."""
        return [self.starts[b + 1] - self.starts[b] for b in range(self.num_bands)]


def band_starts(num_entries: int, num_bands: int = 8, scheme: str = "focused",
                keep_ratio: float = 0.05, focus: float = 3.0) -> List[int]:
    """The rank cuts of :func:`make_bands` (no data needed): a list of M+1 ints.

    ``uniform``: M equal-count bands over all D ranks (``starts[b] = b·D // M``).
    ``focused``: the first M−1 bands split the top ``T = round(min(1, focus·keep_ratio)·D)`` ranks
    evenly, the last band holds the rest; if T covers all of D, equal bands. M = 1: one band.
    """
    _check_band_args(num_entries, num_bands, scheme, keep_ratio, focus)
    D, M = int(num_entries), int(num_bands)
    if M == 1:
        return [0, D]
    if scheme == "focused":
        top = int(round(min(1.0, float(focus) * float(keep_ratio)) * D))
        if top < D:
            return [b * top // (M - 1) for b in range(M)] + [D]
    return [b * D // M for b in range(M)] + [D]


def _check_band_args(num_entries, num_bands, scheme, keep_ratio, focus) -> None:
    if isinstance(num_bands, bool):
        raise ValueError(f"num_bands must be an integer, got {num_bands!r}")
    try:
        num_bands = operator.index(num_bands)
    except TypeError:
        raise ValueError(f"num_bands must be an integer, got {num_bands!r}") from None
    if not 1 <= int(num_bands) <= MAX_BANDS:
        raise ValueError(f"num_bands must be in [1, {MAX_BANDS}], got {num_bands}")
    if scheme not in SCHEMES:
        raise ValueError(f"unknown band scheme {scheme!r} (choose from {', '.join(SCHEMES)})")
    try:
        r = float(keep_ratio)
    except (TypeError, ValueError):
        raise ValueError(f"keep_ratio must be a number, got {keep_ratio!r}") from None
    if not 0.0 < r <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    try:
        c = float(focus)
    except (TypeError, ValueError):
        raise ValueError(f"focus must be a number, got {focus!r}") from None
    if not c > 0.0 or c == float("inf"):
        raise ValueError(f"focus must be a positive finite number, got {focus}")
    if int(num_entries) < 1:
        raise ValueError("cannot make bands over an empty task vector (D = 0)")


# -- making the bands -----------------------------------------------------------------------
CHUNK = 1 << 20          # entries per elementwise chunk on the CPU (a few MiB of temporaries)
CHUNK_DEVICE = 1 << 24   # ... on an accelerator (fewer kernel launches)
_HALF = (torch.float16, torch.bfloat16)
_INF_BITS16 = {torch.float16: 0x7C00, torch.bfloat16: 0x7F80}   # |x| bits >= these: inf / NaN


def _check_values(values) -> None:
    if not isinstance(values, torch.Tensor) or values.dim() != 1:
        raise ValueError("make_bands expects a 1-D tensor (a flat task vector)")
    if not values.is_floating_point():
        raise ValueError(f"make_bands expects a floating-point tensor, got {values.dtype}")


def make_bands(values: torch.Tensor, num_bands: int = 8, scheme: str = "focused",
               keep_ratio: float = 0.05, focus: float = 3.0, *,
               sorted_dtype: torch.dtype = torch.float32) -> Bands:
    """Rank all entries of |values| globally and cut the ranks into ``num_bands`` bands.

    ``values`` is the flat task vector τ (1-D; any float dtype, on any device — magnitudes are
    taken in float32; a 16-bit τ is widened exactly). Raises ValueError on bad arguments or
    non-finite values. Done once per search; never holds an index per entry:

    * ``sorted_abs`` is a sort of the *values* only (equal values are interchangeable there):
      float32 / float64 τ — an in-place numpy sort of a float32 copy (on an accelerator, a
      values-only device sort); 16-bit τ — a counting sort over the ≤ 2^15 magnitude bit
      patterns (O(D), no sort at all);
    * ``band_of`` from the M−1 cut values ``u_b = sorted_abs[starts[b]]``: entries with |τ|
      above / below a cut value fall on its side; entries *equal* to a cut value whose run of
      ties straddles the cut are split by flat index (a chunked count of the equal entries
      seen so far) — exactly the stable-sort definition (|τ| descending, ties by flat index).

    ``band_of`` lives on ``values``' device; ``sorted_abs`` always lives in host memory (only the
    per-candidate threshold search reads it, O(M log D) entries per candidate).
    ``sorted_dtype``: float32 (default, the contract), or τ's own 16-bit dtype when τ is 16-bit
    (exact: the magnitudes *are* 16-bit values; halves its memory).
    Peak extra memory: ``sorted_abs`` + ``band_of`` + O(chunk).
    """
    _check_values(values)
    D = values.numel()
    starts = band_starts(D, num_bands, scheme, keep_ratio, focus)
    M = operator.index(num_bands)
    if sorted_dtype != torch.float32 and sorted_dtype != values.dtype:
        raise ValueError(f"sorted_dtype must be float32 or the task vector's own dtype "
                         f"({values.dtype}), got {sorted_dtype}")
    if sorted_dtype not in (torch.float32,) + _HALF:
        raise ValueError(f"sorted_dtype must be float32, float16 or bfloat16, got {sorted_dtype}")
    values = values.detach()
    if values.dtype in _HALF:
        sorted_abs, lut = _sorted_abs_half(values, sorted_dtype)
    else:
        sorted_abs, lut = _sorted_abs_sort(values), None
    band_of = _assign_bands(values, sorted_abs, starts, lut)
    return Bands(num_bands=M, scheme=scheme, starts=starts, band_of=band_of,
                 sorted_abs=sorted_abs)


def _chunk(values: torch.Tensor) -> int:
    return max(1, min(values.numel(), CHUNK if values.device.type == "cpu" else CHUNK_DEVICE))


def _abs_bits(chunk: torch.Tensor) -> torch.Tensor:
    """int64 bit patterns of |x| for a 16-bit float chunk (monotone in |x| for finite x)."""
    return (chunk.view(torch.int16) & 0x7FFF).long()


def _sorted_abs_half(values: torch.Tensor, sorted_dtype: torch.dtype):
    """Counting sort of a 16-bit τ: (sorted_abs on the CPU, pattern table)."""
    dev = values.device
    counts = torch.zeros(1 << 15, dtype=torch.int64, device=dev)
    C = _chunk(values)
    for s in range(0, values.numel(), C):
        counts += torch.bincount(_abs_bits(values[s:s + C]), minlength=1 << 15)
    counts = counts.cpu()
    if int(counts[_INF_BITS16[values.dtype]:].sum()) > 0:
        raise ValueError("task vector has non-finite (NaN or inf) entries")
    patterns = torch.arange(1 << 15, dtype=torch.int16).view(values.dtype)   # every |x|, ascending
    table = patterns.to(sorted_dtype)
    sorted_abs = torch.empty(values.numel(), dtype=sorted_dtype)
    pos = 0
    nz = torch.nonzero(counts).squeeze(1).flip(0).tolist()                    # descending |x|
    cnt = counts.tolist()
    for p in nz:
        c = cnt[p]
        sorted_abs[pos:pos + c].fill_(table[p])
        pos += c
    assert pos == values.numel()
    return sorted_abs, (patterns.float(), counts)


def _sorted_abs_sort(values: torch.Tensor) -> torch.Tensor:
    """float32 |τ| sorted descending, on the CPU, without an index per entry."""
    D = values.numel()
    C = _chunk(values)
    if values.device.type != "cpu":
        absv = values.float().abs() if values.dtype != torch.float32 else values.abs()
        if not bool(torch.isfinite(absv).all()):
            raise ValueError("task vector has non-finite (NaN or inf) entries")
        out = torch.sort(absv, descending=True).values.cpu()   # values only; indices discarded
        del absv
        return out
    buf = torch.empty(D, dtype=torch.float32)
    for s in range(0, D, C):
        e = min(D, s + C)
        piece = values[s:e]
        if piece.dtype != torch.float32:
            piece = piece.float()
        bc = buf[s:e]
        torch.abs(piece, out=bc)
        if not all_finite(bc):
            raise ValueError("task vector has non-finite (NaN or inf) entries")
        bc.neg_()
    buf.numpy().sort()        # in place, ascending of −|τ| (numpy's SIMD sort; no extra memory)
    buf.neg_()                # −(−0.0) = +0.0: zeros come back as +0.0, as |τ| gives them
    return buf


def _first_at_or_below(sorted_abs: torch.Tensor, u: float, hi: int) -> int:
    """Number of entries of (descending) ``sorted_abs[:hi]`` that are > u (binary search)."""
    lo = 0
    while lo < hi:
        mid = (lo + hi) >> 1
        if float(sorted_abs[mid]) > u:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _assign_bands(values: torch.Tensor, sorted_abs: torch.Tensor, starts: List[int], lut):
    """band_of (uint8, on values' device) from the cut values; see :func:`make_bands`.

    band(d) = #{cuts c : |τ_d| <= u_c} − #{cuts c with q_c > 0 : |τ_d| == u_c and d is among the
    first q_c entries equal to u_c by flat index}, where u_c = sorted_abs[c] and q_c = c − (number
    of entries > u_c) is how many of u_c's ties rank before the cut.
    """
    D = values.numel()
    dev = values.device
    cuts = []
    for c in starts[1:-1]:
        if c >= D:                      # an empty trailing band: nobody reaches it
            continue
        u = float(sorted_abs[c])
        q = c - _first_at_or_below(sorted_abs, u, c)
        cuts.append((u, q))
    band_of = torch.empty(D, dtype=torch.uint8, device=dev)
    if not cuts:
        band_of.zero_()
        return band_of
    us = [u for u, _ in cuts]
    split = [(i, u, q) for i, (u, q) in enumerate(cuts) if q > 0]
    running = {i: 0 for i, _, _ in split}
    C = _chunk(values)
    half = lut is not None
    if half:
        patterns, _counts = lut
        table = torch.zeros(1 << 15, dtype=torch.int32)
        for u in us:
            table += (patterns <= u).to(torch.int32)
        table = table.to(torch.uint8).to(dev)
        # the split values as bit patterns (u is an exact 16-bit value)
        split_bits = {i: int(torch.tensor([u], dtype=values.dtype).view(torch.int16)) & 0x7FFF
                      for i, u, _ in split}
    else:
        many = len(us) > 16
        if many:
            ascending = torch.tensor(sorted(us), dtype=torch.float32, device=dev)
        le = torch.empty(C, dtype=torch.bool, device=dev)
        absb = torch.empty(C, dtype=torch.float32, device=dev)
    for s in range(0, D, C):
        e = min(D, s + C)
        n = e - s
        oc = band_of[s:e]
        piece = values[s:e]
        if half:
            key = _abs_bits(piece)
            torch.index_select(table, 0, key, out=oc)
        else:
            key = absb[:n]
            torch.abs(piece if piece.dtype == torch.float32 else piece.float(), out=key)
            if many:   # #{u >= a} = K − #{u < a}
                idx = torch.bucketize(key, ascending, out_int32=True)
                torch.sub(len(us), idx, out=idx)
                oc.copy_(idx)
                del idx
            else:
                oc.zero_()
                for u in us:
                    torch.le(key, u, out=le[:n])
                    oc.add_(le[:n].view(torch.uint8))   # bool as 0/1 bytes: no type promotion
        for i, u, q in split:
            if running[i] >= q:
                continue
            hit = torch.nonzero(key == (split_bits[i] if half else u)).squeeze(1)
            m = hit.numel()
            take = min(m, q - running[i])
            if take > 0:
                oc[hit[:take]] -= 1
            running[i] += m
    return band_of


def _make_bands_reference(values: torch.Tensor, num_bands: int = 8, scheme: str = "focused",
                          keep_ratio: float = 0.05, focus: float = 3.0) -> Bands:
    """The definition, plainly: one stable sort with an int64 index per entry (O(D) extra
    int64 memory). Kept for tests; :func:`make_bands` must return the same Bands."""
    _check_values(values)
    D = values.numel()
    starts = band_starts(D, num_bands, scheme, keep_ratio, focus)
    M = operator.index(num_bands)
    absv = values.detach().float().abs()
    if not bool(torch.isfinite(absv).all()):
        raise ValueError("task vector has non-finite (NaN or inf) entries")
    # Descending, ties by flat index ascending: a stable sort keeps equal keys in index order.
    sorted_abs, order = torch.sort(absv, descending=True, stable=True)
    del absv
    band_of = torch.empty(D, dtype=torch.uint8, device=values.device)
    for b in range(M):
        if starts[b + 1] > starts[b]:
            band_of.index_fill_(0, order[starts[b]:starts[b + 1]], b)
    del order
    return Bands(num_bands=M, scheme=scheme, starts=starts, band_of=band_of,
                 sorted_abs=sorted_abs.contiguous())
