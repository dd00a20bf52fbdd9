"""The paper's search space (Eq. 2–5), as the search sees it: one weight w_b per magnitude-rank
band; a point's candidate is :func:`~.mask.build_candidate` (keep the k = round(r·D) entries of
largest w_b·|τ|, kept entries carry w_b·τ). Point w = 1 is plain magnitude top-k."""
from __future__ import annotations

import math
from typing import Dict, List

import numpy as np


class MagnitudeSpace:
    """The paper's space: M band weights (``param="log"``: CMA-ES over log2 of them)."""

    name = "magnitude"

    def __init__(self, num_bands: int, lower: float, upper: float, param: str = "linear",
                 keep_ratio: float = 0.05):
        self.num_bands, self.lower, self.upper, self.param = int(num_bands), lower, upper, param
        self.keep_ratio = keep_ratio

    @property
    def dim(self) -> int:
        return self.num_bands

    def bounds(self) -> np.ndarray:
        lo, hi = ((math.log2(self.lower), math.log2(self.upper)) if self.param == "log"
                  else (self.lower, self.upper))
        return np.tile(np.array([[lo, hi]], dtype=np.float64), (self.dim, 1))

    def to_params(self, x) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        return np.exp2(x) if self.param == "log" else x.copy()

    def start_points(self) -> List[np.ndarray]:
        """Generation 0 (in search coordinates): w = 1, plain magnitude top-k."""
        return [np.zeros(self.dim) if self.param == "log" else np.ones(self.dim)]

    def start_labels(self) -> List[str]:
        return ["magnitude"]

    refine_rounds = 0

    def refine(self, points, scores, round_: int):
        """More generation-0 points after the start points were scored: none in the paper's space."""
        return [], []

    def mean0(self, scored, points=None) -> np.ndarray:
        """CMA-ES starts at w = 1 (the paper), whatever generation 0 scored."""
        b = self.bounds()
        return np.clip(self.start_points()[0], b[:, 0], b[:, 1])

    def step_scales(self) -> np.ndarray:
        return np.ones(self.dim)

    def family_stream(self, mean0):
        """Free coordinates of a second CMA-ES stream from ``mean0``; None: one family."""
        return None

    def describe(self, params) -> Dict[str, object]:
        return {"band_weights": [float(v) for v in params]}


__all__ = ["MagnitudeSpace"]
