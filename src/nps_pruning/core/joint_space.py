"""The merge-aware NPS-merge's search space (``nps merge --method nps --joint-generations G``):
every task's point in its own search space (:mod:`.space`) and one λ factor per task, as one
CMA-ES point."""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np


def to_search(space, params) -> np.ndarray:
    """The inverse of ``space.to_params``: a point in parameter units → search coordinates (a
    space with ``canonical`` completes a short point first: a hybrid point of M + 3 has β = 0)."""
    p = np.asarray(space.canonical(params) if hasattr(space, "canonical") else params, dtype=np.float64)
    if space.param != "log":
        return p.copy()
    M = space.num_bands
    head = np.log2(np.maximum(p[:M], 2.0 ** -60))
    return np.concatenate([head, p[M:]])


class JointSpace:
    """The merge-aware search's space (``nps merge --method nps --joint-generations G``): the
    search-space points of N tasks (each task's own space, bands and keep ratio) followed by N
    λ factors, searched as one CMA-ES point. λ_i = λ0_i · 2^u_i with u_i ∈ [−1, 1]. Its one
    start point is the two-stage result (each task's chosen point, u = 0), so the joint search
    is never worse than the two-stage NPS-merge on the score it maximises."""

    name = "joint"
    refine_rounds = 0

    def __init__(self, parts: Sequence, starts: Sequence, lambdas0: Sequence[float]):
        if not (len(parts) == len(starts) == len(lambdas0)) or not parts:
            raise ValueError("joint space: one space, start point and λ per task")
        self.parts = list(parts)
        self.lambdas0 = np.asarray(lambdas0, dtype=np.float64)
        self.dims = [int(p.dim) for p in self.parts]
        b = self.bounds()
        x0 = np.concatenate([to_search(p, w) for p, w in zip(self.parts, starts)]
                            + [np.zeros(len(self.parts))])
        if x0.shape[0] != self.dim:
            raise ValueError("joint space: a start point does not match its task's space")
        self.x0 = np.clip(x0, b[:, 0], b[:, 1])
        self.num_bands = self.dim      # what a search log header records

    @property
    def dim(self) -> int:
        return sum(self.dims) + len(self.parts)

    def bounds(self) -> np.ndarray:
        lam = np.tile(np.array([[-1.0, 1.0]]), (len(self.parts), 1))
        return np.vstack([p.bounds() for p in self.parts] + [lam])

    def split(self, x) -> tuple:
        """(each task's slice of a joint point, the λ-factor coordinates)."""
        x = np.asarray(x, dtype=np.float64)
        out, at = [], 0
        for d in self.dims:
            out.append(x[at:at + d])
            at += d
        return out, x[at:]

    def to_params(self, x) -> np.ndarray:
        parts, u = self.split(x)
        return np.concatenate([p.to_params(xi) for p, xi in zip(self.parts, parts)]
                              + [self.lambdas0 * np.exp2(u)])

    def unpack(self, params) -> tuple:
        """(each task's point in its parameter units, the λ_i) of a point in parameter units
        (the same slices as :meth:`split`: ``to_params`` keeps each task's dimensions)."""
        return self.split(params)

    def start_points(self) -> List[np.ndarray]:
        return [self.x0.copy()]

    def start_labels(self) -> List[str]:
        return ["two-stage"]

    def refine(self, points, scores, round_: int):
        return [], []

    def mean0(self, scored, points=None) -> np.ndarray:
        return self.x0.copy()

    def step_scales(self) -> np.ndarray:
        return np.concatenate([p.step_scales() for p in self.parts] + [np.ones(len(self.parts))])

    def describe(self, params) -> Dict[str, object]:
        points, lambdas = self.unpack(params)
        return {"tasks": [p.describe(w) for p, w in zip(self.parts, points)],
                "lambdas": [float(v) for v in lambdas]}


__all__ = ["JointSpace", "to_search"]
