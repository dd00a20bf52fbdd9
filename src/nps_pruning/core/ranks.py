"""The positions of the top ranks: a candidate's magnitude part in O(k) instead of a pass over τ.

Each band of a candidate keeps a rank prefix (:mod:`.mask`): band b keeps the global ranks
``[starts[b], starts[b] + n_b)``. With the flat positions of the first L ranks at hand (rank =
position in the bands' order: |τ| descending, ties by flat index), the kept positions are those
slices, gathered in O(k) — the exact mask's set, with no D-long pass per candidate.

L only has to reach every band's furthest possible cut, ``starts[b] + min(size_b, k)``: with the
focused bands that is about (focus + 1)·k ranks (r = 0.05, focus 3: a fifth of τ). Finding them is
one chunked pass over τ and one sort of L magnitudes, once per prepared τ; they are kept as int32
(int64 beyond 2^31 entries). :data:`MAX_RANKS` bounds L: above it the per-candidate pass is used
(the same result), so an LLM-sized τ never pays L·4 bytes (and ~36·L bytes while they are found)
for speed. On MiniLM (D = 22.7M) at r = 0.05, L = 4.5M: a hybrid candidate's entries take about
half the time of the pass, and a 0.002 one a seventh.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .bands import Bands, _first_at_or_below

MAX_RANKS = 1 << 23      # at most 8 Mi ranks (32 MiB of int32 positions) are indexed
CHUNK = 1 << 20


def ranks_needed(bands: Bands, k: int) -> int:
    """L: the number of first ranks that hold every band's cut for any candidate keeping ≤ k."""
    starts = bands.starts
    return max((starts[b] + min(starts[b + 1] - starts[b], int(k)) for b in range(bands.num_bands)),
               default=0)


def _magnitude_at(bands: Bands, rank: int) -> float:
    v = bands.sorted_abs[rank]
    return float(v.float()) if v.dtype != torch.float32 else float(v)


def rank_positions(values: torch.Tensor, bands: Bands, count: int) -> torch.Tensor:
    """Flat positions of the first ``count`` ranks of ``bands``' order, in rank order (int32, or
    int64 beyond 2^31 entries; on ``values``' device). Magnitudes are compared in float32, exactly
    as the bands sorted them (a 16-bit τ widens exactly; float64 rounds to float32 first)."""
    D = values.numel()
    L = min(int(count), D)
    dtype = torch.int32 if D < 2 ** 31 - 1 else torch.int64
    if L <= 0:
        return torch.zeros(0, dtype=dtype, device=values.device)
    t = _magnitude_at(bands, L - 1)          # the magnitude of rank L − 1
    # how many entries equal to t rank before L: L less those above t (a prefix of sorted_abs)
    quota = L - _first_at_or_below(bands.sorted_abs, t, L)
    pos, mags, seen = [], [], 0
    for s in range(0, D, CHUNK):
        a = values[s:s + CHUNK].float().abs()
        p = torch.nonzero(a >= t).squeeze(1)
        m = a[p]
        tie = m == t
        if bool(tie.any()):                  # ties at t: the first ``quota`` by flat index
            order = torch.cumsum(tie.to(torch.int64), 0) + seen
            seen += int(tie.sum())
            keep = ~tie | (order <= quota)
            p, m = p[keep], m[keep]
        pos.append(p + s)
        mags.append(m)
    sel = torch.cat(pos)
    assert sel.numel() == L
    by_rank = torch.sort(torch.cat(mags), descending=True, stable=True).indices   # ties: flat order
    return sel[by_rank].to(dtype)


def rank_prefixes(ranks: torch.Tensor, bands: Bands, counts: Sequence[int]) -> torch.Tensor:
    """Positions (``ranks``' dtype) of band b's first ``counts[b]`` ranks, band after band (each
    slice in rank order): the magnitude part of a candidate whose per-band counts are ``counts``."""
    starts = bands.starts
    pieces = [ranks[starts[b]:starts[b] + int(c)] for b, c in enumerate(counts) if c]
    if any(starts[b] + int(c) > ranks.numel() for b, c in enumerate(counts)):
        raise ValueError("the rank index is shorter than a band's cut (ranks_needed was not met)")
    if not pieces:
        return torch.zeros(0, dtype=ranks.dtype, device=ranks.device)
    return torch.cat(pieces)


def maybe_rank_positions(values: torch.Tensor, bands: Bands, k: int,
                         limit: int = MAX_RANKS) -> Optional[torch.Tensor]:
    """:func:`rank_positions` up to :func:`ranks_needed`, or None when that is over ``limit``."""
    L = ranks_needed(bands, k)
    return rank_positions(values, bands, L) if L <= limit else None


__all__ = ["MAX_RANKS", "ranks_needed", "rank_positions", "rank_prefixes", "maybe_rank_positions"]
