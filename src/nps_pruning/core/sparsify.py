"""Single-vector pruners (baselines for ``nps prune --method``, building blocks of the mergers).

``PRUNERS[name](values, keep_ratio, *, seed=0) -> pruned flat τ`` (same shape and dtype as
``values``). Every pruner keeps exactly k = ``keep_count(D, r)`` positions (a kept entry may be
zero only if τ itself is zero there); all others are set to 0. Deterministic: the magnitude
pruners break ties by flat index ascending, the random ones draw from a ``torch.Generator``
seeded with ``seed``.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch

from .mask import keep_count, topk_mask
from .registry import registrar

Pruner = Callable[..., torch.Tensor]
PRUNERS: Dict[str, Pruner] = {}


register_pruner = registrar(PRUNERS, "pruner", """Decorator: ``@register_pruner("name")`` adds
``fn(values, keep_ratio, *, seed=0)`` to :data:`PRUNERS`. A name can be registered once.""")


def _flat(values: torch.Tensor) -> torch.Tensor:
    if not isinstance(values, torch.Tensor) or not values.is_floating_point():
        raise ValueError("pruners expect a floating-point tensor")
    return values.reshape(-1)


def random_order(num_entries: int, seed: int) -> torch.Tensor:
    """The seeded random permutation of 0 .. num_entries − 1 that DARE keeps a prefix of (and the
    hybrid space's random part, and the store's ``seeded`` mask coding), on the CPU, drawn in
    int32 where it fits (the same permutation as int64 ``randperm``, at half its memory)."""
    gen = torch.Generator().manual_seed(int(seed))
    dtype = torch.int32 if num_entries < 2 ** 31 - 1 else torch.int64
    return torch.randperm(num_entries, generator=gen, dtype=dtype)


def _random_positions(num_entries: int, k: int, seed: int, device) -> torch.Tensor:
    """The first k of :func:`random_order` (for an LLM's D the permutation is the largest thing a
    DARE prune holds: the rest of it is freed)."""
    return random_order(num_entries, seed)[:k].clone().to(device)


@register_pruner("magnitude")
def magnitude_prune(values: torch.Tensor, keep_ratio: float, *, seed: int = 0) -> torch.Tensor:
    """Keep the k entries of largest |τ| (ties by flat index ascending); zero the rest.
    ``seed`` is accepted for a uniform interface and unused."""
    flat = _flat(values)
    k = keep_count(flat.numel(), keep_ratio)
    mask = topk_mask(flat.detach().float().abs(), k)
    return (flat * mask).reshape(values.shape)


@register_pruner("ties-trim")
def ties_trim(values: torch.Tensor, keep_ratio: float, *, seed: int = 0) -> torch.Tensor:
    """The trim step of TIES-Merging (Yadav et al. 2023) on one task vector: keep the top-k
    entries by magnitude, no rescaling. On a single vector this is *identical* to ``magnitude``
    (TIES' sign election and disjoint mean only act when merging several vectors: see
    ``core.merge``); it is listed separately so ``--method ties-trim`` names what it does."""
    return magnitude_prune(values, keep_ratio, seed=seed)


@register_pruner("dare")
def dare_prune(values: torch.Tensor, keep_ratio: float, *, seed: int = 0) -> torch.Tensor:
    """DARE (Yu et al. 2024): keep exactly k entries chosen uniformly at random (seeded
    ``randperm``), rescale the kept ones by D/k (= 1/(1−p), p the drop rate); zero the rest."""
    flat = _flat(values)
    D = flat.numel()
    k = keep_count(D, keep_ratio)
    idx = _random_positions(D, k, seed, flat.device)
    out = torch.zeros_like(flat)
    out[idx] = flat[idx] * (D / k)
    return out.reshape(values.shape)


@register_pruner("random")
def random_prune(values: torch.Tensor, keep_ratio: float, *, seed: int = 0) -> torch.Tensor:
    """Keep exactly k entries chosen uniformly at random (seeded), unscaled; zero the rest.
    (Same positions as ``dare`` for the same seed; DARE additionally rescales.)"""
    flat = _flat(values)
    D = flat.numel()
    k = keep_count(D, keep_ratio)
    idx = _random_positions(D, k, seed, flat.device)
    out = torch.zeros_like(flat)
    out[idx] = flat[idx]
    return out.reshape(values.shape)


__all__ = ["PRUNERS", "register_pruner", "random_order", "magnitude_prune", "ties_trim", "dare_prune",
           "random_prune"]
