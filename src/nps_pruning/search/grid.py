"""The one λ-grid search: try each value of a grid, keep the best (ties: the first).

Used by ``nps merge`` (the baselines' λ, NPS-merge's common λ*) and ``nps transfer`` (λ by
H-score); a pure function of the grid and the scoring function, no I/O.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, List, NamedTuple

from ..errors import NPSError


class GridChoice(NamedTuple):
    value: Any              # the grid value with the highest score (ties: the first in grid order)
    index: int              # its position in the grid
    score: float            # its score
    scores: List[float]     # every value's score, in grid order (duplicates included)
    extra: Any              # what score_fn returned with the best score (None for a bare score)


def grid_search(grid: Iterable, score_fn: Callable[[Any], Any], *, what: str = "grid") -> GridChoice:
    """Score every value of ``grid`` in order; return the best.

    ``score_fn(value)`` returns a score, or ``(score, extra)``: only the best value's ``extra``
    is kept (e.g. the merged task vector, so it need not be built again), the others are dropped
    as soon as they are beaten.

    Ties go to the first value in grid order (to prefer the smaller λ, pass the grid sorted).
    A NaN score (a merged model whose outputs are not finite, say) never wins while some value
    scores a number; only when every score is NaN is the first value returned. A ``score_fn`` that raises stops the search
    (the exception propagates). An empty grid is an :class:`NPSError` naming ``what``."""
    values = list(grid)
    if not values:
        raise NPSError(f"{what}: the grid is empty; give at least one value to try")
    scores: List[float] = []
    best = None                                   # (index, score, extra)
    for i, value in enumerate(values):
        out = score_fn(value)
        score, extra = out if isinstance(out, tuple) else (out, None)
        score = float(score)
        scores.append(score)
        if best is None or score > best[1] or (math.isnan(best[1]) and not math.isnan(score)):
            best = (i, score, extra)
    i, score, extra = best
    return GridChoice(values[i], i, score, scores, extra)
