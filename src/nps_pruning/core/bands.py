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

SCHEMES = ("uniform", "focused")
MAX_BANDS = 255  # band_of is uint8


@dataclass
class Bands:
    """M contiguous rank bands over D entries.

    * ``starts``: band ``b`` holds global ranks ``[starts[b], starts[b+1])``; ``len == M+1``,
      ``starts[0] == 0``, ``starts[M] == D`` (a band may be empty when D < M);
    * ``band_of``: uint8 (D,), the band of each flat entry;
    * ``sorted_abs``: float32 (D,), |τ| in rank order (descending, ties by flat index).
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


def make_bands(values: torch.Tensor, num_bands: int = 8, scheme: str = "focused",
               keep_ratio: float = 0.05, focus: float = 3.0) -> Bands:
    """Rank all entries of |values| globally and cut the ranks into ``num_bands`` bands.

    ``values`` is the flat task vector τ (1-D; any float dtype — magnitudes are taken in float32).
    Raises ValueError on bad arguments or non-finite values. One sort over D (done once).
    """
    if not isinstance(values, torch.Tensor) or values.dim() != 1:
        raise ValueError("make_bands expects a 1-D tensor (a flat task vector)")
    if not values.is_floating_point():
        raise ValueError(f"make_bands expects a floating-point tensor, got {values.dtype}")
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
