"""`nps transfer` (Eq. 6): θ = θ_pre + λ·τ̂, λ chosen on both abilities' calibration data.

The slim task vector τ̂ (NPS or a baseline) moves the model less than τ does, so the new task is
learned while less of the original ability is forgotten. λ maximises the H-score 2ab/(a+b) of the
source score a and the target score b on calibration data.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
import shutil
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from ..checkpoints.external import input_sources
from ..errors import NPSError
from ..report.report import now_iso, versions, write_json
from ..search.grid import grid_search
from .prune import Session, check_prune_options, prepare_work_dir, prune, search_report
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


def run_transfer(opts) -> Dict[str, Any]:
    if opts.tau_dtype != "float32":
        raise NPSError("--tau-dtype is supported by nps prune only (merges and stores use float32 τ)")
    from ..checkpoints import open_checkpoint, save_model_folder
    from ..checkpoints.save import atomic_output_dir
    t0 = time.perf_counter()
    if not opts.lambdas:       # an empty list from a YAML config; argparse needs at least one
        raise NPSError("lambdas: give at least one λ to try")
    inputs = [opts.pretrained, opts.finetuned]
    wd = prepare_work_dir(opts.output, opts.resume, inputs, searches=opts.method == "nps")
    session = Session.load(opts.pretrained, opts.finetuned, model_factory=opts.model_factory,
                           allow_shape_mismatch=opts.allow_shape_mismatch,
                           running_stats=opts.running_stats, device=opts.device)
    ev_kw = {"calib_size": opts.calib_size, "seed": opts.seed, "batch_size": opts.batch_size,
             "max_length": opts.max_length}
    source = session.evaluator(opts.eval_source, **ev_kw)
    target = session.evaluator(opts.eval_target, **ev_kw)
    if opts.method != "none":
        check_prune_options(opts.method, opts, opts.eval_target)
    res = transfer(session, opts.method, source, target, lambdas=opts.lambdas,
                   settings=PruneSettings.from_options(opts), eval_target_spec=opts.eval_target,
                   log_path=wd / "search.jsonl", resume=opts.resume, progress=not opts.quiet)
    outcome = res["outcome"]
    tv = session.task_vector
    report = {
        "command": "transfer", "created": now_iso(), "settings": dataclasses.asdict(opts),
        "inputs": input_sources(opts),
        "seed": opts.seed, "versions": versions(), "lambda": res["lambda"],
        "lambda_grid": res["lambda_grid"],
        "model": {"num_entries": tv.num_entries, "kept": int(torch.count_nonzero(res["tau_hat"])),
                  "keep_ratio": opts.keep if opts.method != "none" else 1.0,
                  "task_specific": sorted(tv.task_specific), "buffers": sorted(tv.buffers)},
        "calibration": res["calibration"], "test": {},
        "search": search_report(outcome.search if outcome else None),
        "timings": {"load_s": session.load_s, "total_s": time.perf_counter() - t0},
    }
    from .merge import check_finite_model
    final_values = (res["lambda"] * res["tau_hat"]).cpu()
    check_finite_model(session.base_flat.cpu(), final_values,
                       f"the transferred model (λ = {res['lambda']})")
    final = tv.with_values(final_values)
    with atomic_output_dir(opts.output, inputs=inputs) as tmp:
        save_model_folder(tmp, final.state_dict(session.base_flat.cpu()),
                          like=open_checkpoint(opts.finetuned), inputs=inputs)
        write_json(tmp / "report.json", report)
        from ..report.model_card import write_model_card
        from .prune import _given
        write_model_card(tmp, kind="transferred", name=Path(opts.output).name,
                         pretrained=_given(opts, "pretrained"), method=opts.method,
                         keep=opts.keep if opts.method != "none" else None,
                         settings={"lam": res["lambda"], "seed": opts.seed},
                         calibration={f"{k}": v for k, v in (res.get("calibration") or {}).items()
                                      if isinstance(v, (int, float))})
        if outcome is not None and outcome.search is not None:
            from ..report.plots import plot_search
            plot_search(outcome.search, tmp / "search.png", title=f"NPS search for transfer: {tv.name}")
            shutil.copy2(wd / "search.jsonl", tmp / "search.jsonl")
    from ..workdirs import release_work_dir
    release_work_dir(wd)
    if not opts.quiet:
        print(f"λ = {res['lambda']:g}")
        for who, s in res["calibration"].items():
            print(f"{who:10s} source {s['source']:.4f}  target {s['target']:.4f}  H {s['h_score']:.4f}")
        print(f"wrote {opts.output}")
    return report
