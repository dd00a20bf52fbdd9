"""Masks that do not collide (issue "Fusion that beats TIES", item 2).

Global magnitude masks of different tasks overlap on the same entries and bunch up in a few
layers, where their sum interferes (CABS, ICML 2025). Two remedies, both pure functions over an
``(N, D)`` matrix of flat task vectors:

* **allotment** — each entry is kept by at most one task:

  - :func:`allot` on already sparse vectors (NPS-pruned τ̂_i, DARE- or TIES-trimmed τ_i): where
    several rows are nonzero, ``rule="magnitude"`` keeps the row of largest |value| (ties: the
    lower row), ``rule="order"`` keeps the first row (task order is priority);
  - :func:`sequential_trim` on dense vectors (CABS-style): task 1 keeps its k = round(r·D)
    largest magnitudes, task 2 its k largest among the entries task 1 did not take, and so on —
    every task keeps exactly k entries and no two share one (needs N·k ≤ D).

* **balance across layers** — :func:`layer_trim`: each tensor of the layout keeps its own
  round(r·size) largest magnitudes instead of one global top-k over the whole vector.

``COLLIDE_RULES`` names the options of ``nps merge --collide``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from .mask import keep_count, topk_mask

COLLIDE_RULES = ("allow", "magnitude", "order")

Shape = Tuple[int, ...]


def _check(taus: torch.Tensor) -> None:
    if not isinstance(taus, torch.Tensor) or taus.dim() != 2 or not taus.is_floating_point():
        raise ValueError("task vectors must be a floating point (N, D) tensor, one row per task")


def allot(taus: torch.Tensor, rule: str = "magnitude") -> torch.Tensor:
    """Keep each entry in at most one row (see the module docstring); ``rule="allow"`` returns
    ``taus`` unchanged. Zeros stay zeros; a kept value is not changed."""
    _check(taus)
    if rule not in COLLIDE_RULES:
        raise ValueError(f"collide rule must be one of {', '.join(COLLIDE_RULES)}, got {rule!r}")
    if rule == "allow":
        return taus
    nonzero = taus != 0
    if rule == "order":
        # the first nonzero row of each column: argmax over a bool cast returns the first max
        owner = nonzero.to(torch.uint8).argmax(dim=0)
    else:
        # argmax returns the first of equal maxima, so ties go to the lower row
        owner = taus.abs().argmax(dim=0)
    keep = torch.zeros_like(nonzero)
    keep[owner, torch.arange(taus.shape[1], device=taus.device)] = True
    return torch.where(keep & nonzero, taus, torch.zeros_like(taus))


def sequential_trim(taus: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """CABS-style conflict-free trim: row i keeps exactly k = round(r·D) entries, its largest
    magnitudes among the entries rows 0..i−1 did not take (ties by flat index)."""
    _check(taus)
    n, D = taus.shape
    k = keep_count(D, keep_ratio)
    if n * k > D:
        raise ValueError(f"sequential trim: {n} tasks × {k} kept entries exceed the {D} entries; "
                         "lower the keep ratio")
    taken = torch.zeros(D, dtype=torch.bool, device=taus.device)
    out = torch.zeros_like(taus)
    for i, row in enumerate(taus):
        # taken entries score below every free one (|τ| ≥ 0 > −1), so the top k are all free
        scores = torch.where(taken, torch.full_like(row, -1.0), row.abs())
        mask = topk_mask(scores, k)
        out[i, mask] = row[mask]
        taken |= mask
    return out


def _sizes(shapes: Optional[Sequence[Shape]], D: int):
    if shapes is None:
        raise ValueError("layer-balanced trimming needs the tensors' shapes (shapes=Layout.shapes)")
    sizes = []
    for shape in shapes:
        size = 1
        for s in shape:
            size *= int(s)
        sizes.append(size)
    if sum(sizes) != D:
        raise ValueError(f"shapes cover {sum(sizes)} entries, the task vectors have {D}")
    return sizes


def layer_trim(taus: torch.Tensor, keep_ratio: float, shapes: Optional[Sequence[Shape]]) -> torch.Tensor:
    """Each tensor of ``shapes`` (layout order) keeps, in each row, its round(r·size) largest
    magnitudes (ties by index): the kept count is spread over the layers as their sizes are."""
    _check(taus)
    sizes = _sizes(shapes, taus.shape[1])
    out = torch.zeros_like(taus)
    start = 0
    for size in sizes:
        k = keep_count(size, keep_ratio)
        for i in range(taus.shape[0]):
            seg = taus[i, start:start + size]
            mask = topk_mask(seg.abs(), k)
            out[i, start:start + size][mask] = seg[mask]
        start += size
    return out


__all__ = ["COLLIDE_RULES", "allot", "sequential_trim", "layer_trim"]
