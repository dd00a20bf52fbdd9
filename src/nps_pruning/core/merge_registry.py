"""The registry of mergers (:data:`MERGERS`) and the input checks every merger shares.

Its own module so that the mergers of :mod:`.merge` and :mod:`.merge_svd` both register here
without importing each other; :mod:`.merge` is the public face (``MERGERS``, ``merge``).
"""
from __future__ import annotations

from typing import Callable, Dict

import torch

from .registry import registrar

Merger = Callable[..., torch.Tensor]

MERGERS: Dict[str, Merger] = {}


register_merger = registrar(MERGERS, "merger", "Decorator adding a merger to :data:`MERGERS` "
                                                "under ``name`` (names are unique).")


# Column slices for the entry-wise steps of the merges (each entry is merged on its own, so a
# slice at a time gives the same result with the temporaries of a slice: N x 4M, not N x D)
COLUMN_CHUNK = 1 << 22


# -- validation ---------------------------------------------------------------------------------
def check_taus(taus: torch.Tensor) -> None:
    if not isinstance(taus, torch.Tensor) or taus.dim() != 2:
        raise ValueError("task vectors must be an (N, D) tensor, one row per task")
    if taus.shape[0] < 1 or taus.shape[1] < 1:
        raise ValueError(f"need at least one task and one entry, got shape {tuple(taus.shape)}")
    if not taus.is_floating_point():
        raise ValueError(f"task vectors must be floating point, got {taus.dtype}")
    for s in range(0, taus.shape[1], COLUMN_CHUNK):      # in column slices: no (N, D) bool at once
        if not bool(torch.isfinite(taus[:, s:s + COLUMN_CHUNK]).all()):
            raise ValueError("task vectors hold NaN or infinite entries")


def check_scalar(name: str, value: float) -> float:
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    return value
