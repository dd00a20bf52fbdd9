"""The prepared task vector: τ with what every pruned vector of it is decoded from, built once.

A search, its held-out re-scoring, the written τ̂, a merge's joint search and the benchmark all
turn points of a search space into pruned task vectors. :func:`prepare` builds what they need with
one rule — the domain (the entries a pruner may keep), the magnitude-rank bands over it, the
hybrid space's seeded random order — and :class:`Prepared` decodes a point into τ̂
(:meth:`Prepared.build`) or into its kept entries (:meth:`Prepared.entries`).

**The domain.** A tensor whose τ is identically zero was not changed by the fine-tune (the tensors
a LoRA adapter does not touch, frozen layers). It is left out of D: k = round(r·D_changed), DARE's
and the hybrid space's random positions are drawn among the changed entries and rescaled by
D_changed / k, and the bands rank the changed entries only — so r is the same share of the update
for every method, and "kept k of D" is true. With no such tensor (the usual full fine-tune) the
domain is all of τ, nothing is copied, and every result is the one the core functions give on τ.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional, Tuple

import numpy as np
import torch

from .bands import Bands, make_bands
from .entries import candidate_entries
from .mask import keep_count
from .ranks import maybe_rank_positions
from .space import SPACES, HybridIndex, build_point, make_hybrid_index


@dataclass(frozen=True)
class Domain:
    """The entries of a flat τ that pruning may keep: ``spans``, (start, stop) ranges in flat
    order (adjacent ranges joined), of ``total`` entries in all."""

    spans: Tuple[Tuple[int, int], ...]
    total: int

    @classmethod
    def whole(cls, total: int) -> "Domain":
        return cls(((0, int(total)),) if total else (), int(total))

    @property
    def count(self) -> int:
        """D of the pruners: the entries in the domain."""
        return sum(b - a for a, b in self.spans)

    @property
    def is_whole(self) -> bool:
        return self.count == self.total

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """The domain's entries of a flat vector, in flat order (``values`` itself when whole)."""
        self._check(values)
        if self.is_whole:
            return values
        return torch.cat([values[a:b] for a, b in self.spans])

    def scatter(self, compact: torch.Tensor) -> torch.Tensor:
        """A flat vector of ``total`` entries: ``compact`` on the domain, zero elsewhere
        (``compact`` itself when whole)."""
        if compact.numel() != self.count:
            raise ValueError(f"a vector over this domain has {self.count} entries, got {compact.numel()}")
        if self.is_whole:
            return compact
        out = torch.zeros(self.total, dtype=compact.dtype, device=compact.device)
        pos = 0
        for a, b in self.spans:
            out[a:b] = compact[pos:pos + b - a]
            pos += b - a
        return out

    def to_full(self, idx: torch.Tensor) -> torch.Tensor:
        """Flat positions of the domain positions ``idx`` (ascending stays ascending)."""
        if self.is_whole:
            return idx
        starts = torch.tensor([a for a, _ in self.spans], dtype=torch.int64)
        compact_starts = torch.tensor(np.cumsum([0] + [b - a for a, b in self.spans[:-1]]),
                                      dtype=torch.int64)
        idx64 = idx.to(torch.int64).cpu()
        seg = torch.searchsorted(compact_starts, idx64, right=True) - 1
        return (idx64 + (starts - compact_starts)[seg]).to(idx.device)

    def _check(self, values: torch.Tensor) -> None:
        if values.dim() != 1 or values.numel() != self.total:
            raise ValueError(f"expected a flat vector of {self.total} entries, got shape "
                             f"{tuple(values.shape)}")


def changed_domain(values: torch.Tensor, spans: Iterable[Tuple[int, int]]) -> Domain:
    """The domain of τ = ``values`` (1-D): the tensors (``spans``: each tensor's (start, stop) in
    flat order, e.g. ``(s, e) for _, s, e, _ in layout.spans()``) with a non-zero entry. A τ with
    no non-zero entry at all keeps every tensor (nothing to leave out in favour of)."""
    total = values.numel()
    keep = []
    for a, b in spans:
        if b > a and bool(values[a:b].any()):
            if keep and keep[-1][1] == a:
                keep[-1] = (keep[-1][0], b)
            else:
                keep.append((a, b))
    if not keep:
        return Domain.whole(total)
    return Domain(tuple(keep), total)


def prune_in_domain(pruner, values: torch.Tensor, keep_ratio: float, domain: Optional[Domain], *,
                    seed: int = 0) -> torch.Tensor:
    """``pruner(values, keep_ratio, seed=seed)`` (a :data:`~.sparsify.PRUNERS` entry) over the
    domain's entries only, zero elsewhere."""
    if domain is None or domain.is_whole:
        return pruner(values, keep_ratio, seed=seed)
    return domain.scatter(pruner(domain.gather(values), keep_ratio, seed=seed))


def sorted_dtype_of(values: torch.Tensor) -> torch.dtype:
    """The bands' sorted |τ| dtype: τ's own (16-bit τ stays 16-bit), float32 for float64."""
    return values.dtype if values.dtype != torch.float64 else torch.float32


@dataclass
class Prepared:
    """τ prepared for decoding points of one search space at one keep ratio."""

    values: torch.Tensor              # τ, flat (all D entries)
    domain: Domain
    compact: torch.Tensor             # the domain's entries of τ (τ itself when whole)
    bands: Bands                      # over ``compact``
    index: Optional[HybridIndex]      # the hybrid space's random order over ``compact``
    space: str                        # "magnitude" | "hybrid"
    keep: float
    kept_values: str = "weighted"
    use_ranks: bool = True            # index the top ranks for O(k) candidates (same results)
    _ranks: Optional[tuple] = field(default=None, init=False, repr=False)

    @property
    def num_bands(self) -> int:
        return self.bands.num_bands

    def ranks(self) -> Optional[torch.Tensor]:
        """The positions of the first ranks a candidate can keep (:mod:`.ranks`), found on first
        use; None when switched off or over :data:`~.ranks.MAX_RANKS`."""
        if self._ranks is None:
            self._ranks = (maybe_rank_positions(self.compact, self.bands,
                                                keep_count(self.compact.numel(), self.keep))
                           if self.use_ranks else None,)
        return self._ranks[0]

    def entries(self, params) -> Tuple[torch.Tensor, torch.Tensor]:
        """(flat positions ascending, τ̂ values in float32) of the point ``params`` (parameter
        units): see :func:`~.entries.candidate_entries`."""
        idx, vals = candidate_entries(self.space, self.compact, self.bands, self.index,
                                      np.asarray(params, dtype=np.float64), self.keep,
                                      kept_values=self.kept_values, ranks=self.ranks())
        return self.domain.to_full(idx), vals

    def build(self, params, *, base: Optional[torch.Tensor] = None,
              out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """τ̂ of the point ``params`` over all D entries (float32), or with ``base`` (θ_pre, flat)
        base + τ̂; into ``out`` when given."""
        p = np.asarray(params, dtype=np.float64)
        if self.domain.is_whole:
            return build_point(self.space, self.values, self.bands, self.index, p, self.keep,
                               base=base, out=out, kept_values=self.kept_values)
        idx, vals = self.entries(p)
        if base is None:
            res = (out.zero_() if out is not None else
                   torch.zeros(self.domain.total, dtype=torch.float32, device=self.values.device))
            res[idx] = vals.to(res.dtype)
            return res
        res = out if out is not None else torch.empty(self.domain.total, dtype=base.dtype,
                                                      device=base.device)
        res.copy_(base)
        res[idx] = (base[idx].float() + vals).to(res.dtype)
        return res


def prepare(values: torch.Tensor, spans, *, keep: float, num_bands: int, scheme: str = "focused",
            focus: float = 3.0, space: str = "hybrid", seed: int = 0,
            kept_values: str = "weighted") -> Prepared:
    """Build the :class:`Prepared` of τ = ``values`` for ``space`` at ``keep``; ``spans``: the
    tensors' flat (start, stop) ranges (the domain leaves out the all-zero ones), a
    :class:`Domain` already found, or None (all of τ)."""
    if space not in SPACES:
        raise ValueError(f"unknown search space {space!r} (choose from {', '.join(SPACES)})")
    if space == "hybrid" and kept_values != "weighted":
        raise ValueError("the hybrid space carries its own scales; kept_values must be 'weighted'")
    if isinstance(spans, Domain):
        domain = spans
    else:
        domain = changed_domain(values, spans) if spans is not None else Domain.whole(values.numel())
    compact = domain.gather(values)
    bands = make_bands(compact, num_bands, scheme, keep, focus, sorted_dtype=sorted_dtype_of(values))
    index = make_hybrid_index(compact, seed) if space == "hybrid" else None
    return Prepared(values, domain, compact, bands, index, space, float(keep), kept_values)


def layout_spans(layout) -> list:
    """(start, stop) of each tensor of a :class:`~nps_pruning.task_vector.Layout`."""
    return [(s, e) for _, s, e, _ in layout.spans()]


__all__ = ["Domain", "changed_domain", "prune_in_domain", "Prepared", "prepare", "layout_spans",
           "sorted_dtype_of"]
