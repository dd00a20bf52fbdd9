"""A candidate as its kept entries: what a scorer writes into a model that holds θ_pre itself.

:func:`candidate_entries` gives the k kept positions of a point of a search space and their τ̂
values, computed with the very float operations of :func:`~.space.build_point`; writing
``θ_pre[idx] + vals`` there (and restoring the k saved values afterwards) gives the model the
dense candidate bit for bit with O(k) memory instead of a second D-long copy of θ_pre.

With ``ranks`` (:func:`~.ranks.rank_positions`) the magnitude part is gathered from the rank
prefixes and the random part from the permutation's prefix, in O(k + the scanned prefix), no
D-long pass: the same entries and the same float32 values (sorted back to ascending positions).
"""
from __future__ import annotations

import numpy as np
import torch

from .mask import KEPT_VALUES, _check_values, _plan, _weights32, candidate_mask, keep_count
from .ranks import rank_prefixes
from .hybrid import _code_table, _hybrid_code, hybrid_plan


def candidate_entries(space, values, bands, index, params, keep_ratio, *, kept_values="weighted",
                      ranks=None):
    """(idx, vals): the k kept entries of a point (int64 positions, ascending) and their τ̂ values
    (float32), computed with the very float operations of :func:`build_point`, so that
    ``base[idx] + vals`` is bit for bit ``build_point(..., base=base)[idx]`` and every other entry
    of that candidate is ``base``. What a scorer needs to write a candidate into a model that holds
    θ_pre and to restore it afterwards (O(k) memory, not a second D-long vector). ``ranks``: the
    positions of the first :func:`~.ranks.ranks_needed` ranks, for the O(k) path."""
    M = bands.num_bands
    if getattr(space, "name", space) == "magnitude":       # a space or its name
        if kept_values not in KEPT_VALUES:
            raise ValueError(f"kept_values must be one of {KEPT_VALUES}, got {kept_values!r}")
        if ranks is not None:
            _check_values(values, bands)
            counts = _plan(bands, params, keep_count(values.numel(), keep_ratio)).counts
            idx = _ascending(rank_prefixes(ranks, bands, counts))
        else:
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
    plan = hybrid_plan(values, bands, index, params, keep_ratio, ranks=ranks)
    if plan.rand_idx is not None:     # β > 0: the magnitude part coded, the random part as sampled
        mag_idx = (_ascending(plan.mag_pos) if plan.mag_pos is not None
                   else torch.nonzero(plan.mag).squeeze(1))
        key = bands.band_of[mag_idx].long().add_(M)
        mag_vals = values[mag_idx].float() * _code_table(plan, M, values.device)[key]
        pos = torch.cat([mag_idx, plan.rand_idx])
        order = _merge_order(pos)
        return pos[order], torch.cat([mag_vals, plan.rand_vals])[order]
    if ranks is not None:        # the kept positions gathered, then the code only there
        rand = index.perm[:plan.last_pos + 1]
        idx = _ascending(torch.cat([plan.mag_pos, rand[~plan.mag[rand]]]))   # + the first k_rand free
        key = bands.band_of[idx].long()
        key.add_(2 - plan.mag[idx].long(), alpha=M)       # code 1 (magnitude part) or 2 (random)
        return idx, values[idx].float() * _code_table(plan, M, values.device)[key]
    code, table = _hybrid_code(plan, index, M, values.device)
    idx = torch.nonzero(code).squeeze(1)
    key = bands.band_of[idx].long()
    key.add_(code[idx].long(), alpha=M)
    return idx, values[idx].float() * table[key]


def _ascending(pos: torch.Tensor) -> torch.Tensor:
    """int64 positions sorted ascending (numpy's vectorised int32 sort on the CPU: ~10× torch's)."""
    if pos.device.type == "cpu" and pos.dtype == torch.int32:
        return torch.from_numpy(np.sort(pos.numpy())).long()
    return torch.sort(pos.long()).values


def _merge_order(pos: torch.Tensor) -> torch.Tensor:
    """The order that sorts ``pos``, two ascending runs of distinct positions (numpy's stable sort
    on the CPU is a merge of runs: ~3× torch's sort here)."""
    if pos.device.type == "cpu":
        return torch.from_numpy(np.argsort(pos.numpy(), kind="stable"))
    return torch.sort(pos).indices


__all__ = ["candidate_entries"]
