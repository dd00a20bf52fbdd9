"""A candidate as its kept entries: what a scorer writes into a model that holds θ_pre itself.

:func:`candidate_entries` gives the k kept positions of a point of a search space and their τ̂
values, computed with the very float operations of :func:`~.space.build_point`; writing
``θ_pre[idx] + vals`` there (and restoring the k saved values afterwards) gives the model the
dense candidate bit for bit with O(k) memory instead of a second D-long copy of θ_pre.
"""
from __future__ import annotations

import torch

from .mask import KEPT_VALUES, _weights32, candidate_mask
from .space import _hybrid_code, hybrid_plan


def candidate_entries(space, values, bands, index, params, keep_ratio, *, kept_values="weighted"):
    """(idx, vals): the k kept entries of a point (int64 positions, ascending) and their τ̂ values
    (float32), computed with the very float operations of :func:`build_point`, so that
    ``base[idx] + vals`` is bit for bit ``build_point(..., base=base)[idx]`` and every other entry
    of that candidate is ``base``. What a scorer needs to write a candidate into a model that holds
    θ_pre and to restore it afterwards (O(k) memory, not a second D-long vector)."""
    M = bands.num_bands
    if getattr(space, "name", space) == "magnitude":       # a space or its name
        if kept_values not in KEPT_VALUES:
            raise ValueError(f"kept_values must be one of {KEPT_VALUES}, got {kept_values!r}")
        idx = torch.nonzero(candidate_mask(values, bands, params, keep_ratio)).squeeze(1)
        vals = values[idx].float()
        if kept_values == "weighted":
            wtab = torch.from_numpy(_weights32(bands, params)).to(values.device)
            vals = vals * wtab[bands.band_of[idx].long()]
        return idx, vals
    if kept_values != "weighted":
        raise ValueError("the hybrid space carries its own scales; kept_values must be 'weighted'")
    D = values.numel()
    if bands.num_entries != D or index.num_entries != D:
        raise ValueError(f"task vector has {D} entries, bands / index were made for "
                         f"{bands.num_entries} / {index.num_entries}")
    plan = hybrid_plan(values, bands, index, params, keep_ratio)
    code, table = _hybrid_code(plan, index, M, values.device)
    idx = torch.nonzero(code).squeeze(1)
    key = bands.band_of[idx].long()
    key.add_(code[idx].long(), alpha=M)
    return idx, values[idx].float() * table[key]


__all__ = ["candidate_entries"]
