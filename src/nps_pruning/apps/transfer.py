"""Transfer (Eq. 6): θ = θ_pre + λ·τ̂, λ chosen on both abilities' calibration data.

The slim task vector τ̂ (NPS or a baseline) moves the model less than τ does, so the new task is
learned while less of the original ability is forgotten. λ maximises the H-score 2ab/(a+b) of the
source score a and the target score b on calibration data.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from ..search.grid import grid_search
from .prune import Session, prune
from .settings import PruneSettings


def h_score(a: float, b: float) -> float:
    """Harmonic mean 2ab/(a+b) of the source and target scores (0 when both are 0)."""
    return 0.0 if a + b <= 0 else 2.0 * a * b / (a + b)


def choose_lambda(session: Session, tau: torch.Tensor, source: Callable, target: Callable,
                  lambdas: Sequence[float]) -> Dict[str, Any]:
    """Score θ_pre + λ·τ on both abilities for every λ; return the grid and the best λ by H-score
    (ties: the smaller λ, which moves the model less)."""
    grid: List[Dict[str, float]] = []

    def score(lam) -> float:
        a = session.score(source, tau, lam)
        b = float(target(session.model))
        grid.append({"lambda": lam, "source": a, "target": b, "h_score": h_score(a, b)})
        return grid[-1]["h_score"]

    # in ascending order, the first of equal H-scores is the smaller λ
    choice = grid_search(sorted(lambdas), score, what="lambdas")
    return {"grid": grid, "best": grid[choice.index]}


def scores_at(session: Session, tau: torch.Tensor, scale: float, source, target) -> Dict[str, float]:
    a = session.score(source, tau, scale)
    b = float(target(session.model))
    return {"source": a, "target": b, "h_score": h_score(a, b)}


def transfer(session: Session, method: str, source, target, *, lambdas: Sequence[float],
             settings: PruneSettings = PruneSettings(), eval_target_spec: Optional[str] = None,
             log_path=None, resume: bool = False, progress: bool = True) -> Dict[str, Any]:
    """Prune τ with ``method`` ("none": keep τ whole; NPS searches on ``eval_target_spec``), then
    choose λ of ``lambdas`` by the H-score of the ``source`` and ``target`` evaluators.
    Returns {"tau_hat", "lambda", "lambda_grid", "calibration": {...}, "outcome"}."""
    tv = session.task_vector
    if method == "none":
        tau_hat, outcome = tv.values, None
    else:
        outcome = prune(session, method, settings=settings, eval_spec=eval_target_spec,
                        log_path=log_path, resume=resume, progress=progress)
        tau_hat = outcome.pruned
    choice = choose_lambda(session, tau_hat, source, target, lambdas)
    lam = choice["best"]["lambda"]
    calib = {"pretrained": scores_at(session, tv.values, 0.0, source, target),
             "finetuned": scores_at(session, tv.values, 1.0, source, target),
             "result": {k: choice["best"][k] for k in ("source", "target", "h_score")}}
    return {"tau_hat": tau_hat, "lambda": lam, "lambda_grid": choice["grid"], "calibration": calib,
            "outcome": outcome}
