"""Search spaces of NPS: what one CMA-ES point means as a pruned task vector.

``magnitude`` — the paper's space (Eq. 2–5), exactly as :func:`~.mask.build_candidate`: one weight
w_b per magnitude-rank band; keep the k = round(r·D) entries of largest w_b·|τ|; kept entries
carry w_b·τ. Point w = 1 is plain magnitude top-k.

``hybrid`` — contains magnitude pruning and DARE as exact points (each wins in its own regime,
DAREx, DELLA). A point is (w_1..w_M, g, α, h, β): band weights of a magnitude part, its log2
rescale g, the random share α, the random part's log2 rescale correction h and its rank power β
(0: uniform, DARE's permutation; > 0: large entries preferred). The candidate: :mod:`.hybrid`;
the space's start points and bounds: :mod:`.hybrid_space`; the paper's: :mod:`.magnitude_space`.
"""
from __future__ import annotations

from .hybrid import (HybridIndex, build_hybrid, hybrid_plan, hybrid_reference, make_hybrid_index,
                     split_params)
from .hybrid_space import HybridSpace
from .magnitude_space import MagnitudeSpace
from .mask import build_candidate

SPACES = {"magnitude": MagnitudeSpace, "hybrid": HybridSpace}


SEARCH_SPACES = (*SPACES, "joint")   # the names SearchSettings.space accepts (joint: .joint_space)


def make_space(name: str, num_bands: int, lower: float, upper: float, param: str = "linear",
               keep_ratio: float = 0.05):
    if name not in SPACES:
        raise ValueError(f"unknown search space {name!r} (choose from {', '.join(SPACES)})")
    return SPACES[name](num_bands, lower, upper, param, keep_ratio)


def build_point(space, values, bands, index, params, keep_ratio, *, base=None, out=None,
                kept_values="weighted"):
    """The candidate of ``params`` (already in parameter units) in ``space`` (a space or its
    name: decoding needs no bounds)."""
    if getattr(space, "name", space) == "magnitude":
        return build_candidate(values, bands, params, keep_ratio, base=base, out=out,
                               kept_values=kept_values)
    if kept_values != "weighted":
        raise ValueError("the hybrid space carries its own scales; kept_values must be 'weighted'")
    return build_hybrid(values, bands, index, params, keep_ratio, base=base, out=out)


__all__ = ["HybridIndex", "make_hybrid_index", "hybrid_plan", "build_hybrid", "hybrid_reference",
           "MagnitudeSpace", "HybridSpace", "SPACES", "SEARCH_SPACES", "make_space", "build_point", "split_params"]
