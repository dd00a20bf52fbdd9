"""The hybrid search space as the search sees it: a point (w_1..w_M, g, α, h, β) — band weights of
a magnitude part, its log2 rescale g, the random share α, the random part's log2 rescale
correction h and its rank power β (the candidate: :mod:`.hybrid`) — with its bounds, the
generation-0 start points and refinements, CMA-ES's start and the magnitude-line stream."""
from __future__ import annotations

import math
from typing import Dict, List

import numpy as np

from .hybrid import split_params
from .magnitude_space import MagnitudeSpace


class HybridSpace(MagnitudeSpace):
    """Band weights (as :class:`MagnitudeSpace`) + g (log2 rescale of the magnitude part, in
    [−1, log2(1/r)]) + α (random share, [0, 1]) + h (log2 correction of the random part's
    unbiased rescale, [−1, 1]) + β (the random part's rank power, [0, 4])."""

    name = "hybrid"

    @property
    def dim(self) -> int:
        return self.num_bands + 4

    def _extra_bounds(self) -> np.ndarray:
        g_hi = max(1.0, math.log2(1.0 / self.keep_ratio))
        return np.array([[-1.0, g_hi], [0.0, 1.0], [-1.0, 1.0], [0.0, 4.0]], dtype=np.float64)

    def bounds(self) -> np.ndarray:
        head = MagnitudeSpace.bounds(self)[: self.num_bands]
        return np.vstack([head, self._extra_bounds()])

    def to_params(self, x) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        M = self.num_bands
        head = np.exp2(x[:M]) if self.param == "log" else x[:M].copy()
        return np.concatenate([head, x[M:]])

    def canonical(self, params) -> np.ndarray:
        """A point in parameter units with all M + 4 entries (an old report's M + 3: β = 0)."""
        w, g, a, h, b = split_params(params, self.num_bands)
        return np.concatenate([w, [g, a, h, b]])

    def _rescales(self) -> List[int]:
        """The magnitude rescales tried at generation 0: ×2, ×4, ×8 while below 1/r."""
        g_hi = self._extra_bounds()[0, 1]
        return [g for g in (1, 2, 3) if g < g_hi]

    def start_points(self) -> List[np.ndarray]:
        """magnitude (w=1, g=0, α=0), DARE (α=1, h=0, β=0), the half-and-half hybrid (α=0.5),
        magnitude rescaled ×2, ×4, ×8 (g = 1, 2, 3; DAREx-q's tuned rescale, on a grid) and the
        rank-weighted samples β = 1, 2 (α=1; β = 1 is about DELLA's MAGPRUNE, docs/findings.md)."""
        w1 = self._w1()
        pts = [np.concatenate([w1, [0.0, 0.0, 0.0, 0.0]]),
               np.concatenate([w1, [0.0, 1.0, 0.0, 0.0]]),
               np.concatenate([w1, [0.0, 0.5, 0.0, 0.0]])]
        pts += [np.concatenate([w1, [float(g), 0.0, 0.0, 0.0]]) for g in self._rescales()]
        return pts + [np.concatenate([w1, [0.0, 1.0, 0.0, float(b)]]) for b in self.RANK_POWERS]

    RANK_POWERS = (1, 2)

    def start_labels(self) -> List[str]:
        return (["magnitude", "dare", "hybrid-0.5"] + [f"magnitude-x{2 ** g}" for g in self._rescales()]
                + [f"rank-power-{b}" for b in self.RANK_POWERS])

    # the tuned rescale is a sharp optimum (MobileNetV2: ×3 0.97, ×2 0.64, ×4 0.72): generation 0
    # halves the step around the best rescale of the ×2/×4/×8 grid twice (± 0.5, then ± 0.25)
    refine_rounds = 2

    def _w1(self) -> np.ndarray:
        return np.zeros(self.num_bands) if self.param == "log" else np.ones(self.num_bands)

    def refine(self, points, scores, round_: int):
        """(points, labels) to score next in generation 0: g* ± 0.5 / 2^round_ on the line of
        rescaled magnitude top-k (w = 1, α = 0, h = 0) around its best scored g*, inside the box
        and not scored yet."""
        M, w1 = self.num_bands, self._w1()
        line = [(float(p[M]), s) for p, s in zip(points, scores)
                if s is not None and np.array_equal(p[:M], w1) and p[M + 1] == 0.0 and p[M + 2] == 0.0
                and p[M + 3] == 0.0]
        if not line:
            return [], []
        g_best = max(line, key=lambda t: t[1])[0]          # max keeps the earliest of ties
        lo, hi = self._extra_bounds()[0]
        seen = {round(g, 9) for g, _ in line}
        step = 0.5 / 2 ** round_
        out, labels = [], []
        for g in (g_best - step, g_best + step):
            if max(0.0, lo) <= g <= hi and round(g, 9) not in seen:
                out.append(np.concatenate([w1, [g, 0.0, 0.0, 0.0]]))
                labels.append(f"magnitude-x{2.0 ** g:.3g}")
        return out, labels

    def mean0(self, scored, points=None) -> np.ndarray:
        """CMA-ES starts at the best scored generation-0 point (the earliest on ties), pulled
        inside the box; ``points`` default: the start points."""
        pts = list(points) if points is not None else self.start_points()
        best = 0
        for i, s in enumerate(scored):
            if s is not None and (scored[best] is None or s > scored[best]):
                best = i
        b = self.bounds()
        return np.clip(pts[best], b[:, 0], b[:, 1])

    def step_scales(self) -> np.ndarray:
        """Per-dimension initial step, relative to σ0 (σ0 is in band-weight units): g moves in
        log2 units, α in shares, β in powers."""
        return np.concatenate([np.ones(self.num_bands), [2.0, 1.0, 1.0, 2.0]])

    def family_stream(self, mean0):
        """When the best start ``mean0`` is (rescaled) magnitude top-k, a second stream from it
        moves all but α, h and β (held at 0: from α = 0 half the whole space's candidates carry a
        random part rescaled by hundreds at small r, docs/findings.md); None after any other."""
        m, M = np.asarray(mean0, dtype=np.float64), self.num_bands
        if m[M + 1] != 0.0 or m[M + 2] != 0.0 or m[M + 3] != 0.0:
            return None
        return np.arange(self.dim) <= M

    def describe(self, params) -> Dict[str, object]:
        w, g, a, h, b = split_params(params, self.num_bands)
        return {"band_weights": [float(v) for v in w], "log2_scale": g, "random_share": a,
                "log2_random_rescale": h, "random_rank_power": b}


__all__ = ["HybridSpace"]
