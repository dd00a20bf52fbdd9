"""`nps prune`: one fine-tuned model in, its slim task vector and pruned model out.

The per-task step (:func:`prune`, the library's entry point) is shared by transfer, merge,
compress and the benchmark: on a :class:`~.session.Session` (the pair loaded once, the model's
weights bound to one flat buffer) it either searches band weights with CMA-ES (NPS) or applies a
baseline pruner, and scores what is asked for; what it does is a :class:`~.settings.PruneSettings`.
The command ``nps prune`` (:mod:`nps_pruning.cli.prune`) maps its options to these settings,
calls :func:`prune` and writes the output folder.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from ..core import PRUNERS
from ..core.prepared import prune_in_domain
from ..core.space import make_space
from ..errors import NPSError
from ..paths import write_error
from ..report.report import peak_rss_bytes
from ..search import run_search
from ..search.cmaes_search import SearchAborted
from ..search.executors import make_executor
from ..search.identity import run_identity
from ..search.race import race_rows
from ..search.scorer import CandidateScorer
from ..workdirs import claim_work_dir
from .holdout import holdout_finalists, holdout_note, logits_peak, rescore_on_holdout
from .session import Session
from .settings import PruneSettings, SearchSettings

__all__ = ["Session", "PruneSettings", "SearchSettings", "PruneOutcome", "prune",
           "rescore_on_holdout", "holdout_finalists", "band_summary", "search_report"]


@dataclass
class PruneOutcome:
    method: str
    pruned: torch.Tensor                       # τ̂, flat
    keep_ratio: float
    search: Any = None                          # SearchResult for nps
    bands: Any = None                           # the search's band layout (starts; no D-long arrays)
    calibration: Dict[str, float] = field(default_factory=dict)
    timings: Dict[str, float] = field(default_factory=dict)
    aborted: Optional[str] = None               # the search stopped on repeated failures
    rescored: List[Dict[str, Any]] = field(default_factory=list)   # held-out re-scoring
    space: str = "magnitude"
    memory: Dict[str, Optional[int]] = field(default_factory=dict)   # peak resident bytes
    holdout: Dict[str, Any] = field(default_factory=dict)   # how the final candidate was chosen


def _scorer(session: Session, evaluator, prep, settings: PruneSettings, eval_spec: str,
            calib_size=None):
    if settings.executor == "serial":
        return CandidateScorer.from_state(session.base_flat, prep, session.model, session.flat,
                                          evaluator, autocast=settings.autocast,
                                          cpu_linear=settings.cpu_linear)
    # worker processes load the pair from its paths, the way the session was loaded
    run = settings.replace(calib_size=calib_size if calib_size is not None else settings.calib_size,
                           fitness=session.search_fitness(eval_spec, settings.fitness))
    return CandidateScorer(session.pretrained, session.finetuned, eval_spec, run,
                           model_factory=session.model_factory, device=session.device,
                           tau_dtype=session.tau_dtype, running_stats=session.running_stats,
                           allow_shape_mismatch=session.allow_shape_mismatch)


def _identity_fields(session: Session, settings: PruneSettings) -> Dict[str, Any]:
    """What :func:`~nps_pruning.search.identity.run_identity` reads, under the names the search
    logs' headers have always used (so a log written before resumes)."""
    return dict(
        calib_size=settings.calib_size, keep=settings.keep_ratio, bands=settings.bands,
        scheme=settings.scheme, focus=settings.focus, kept_values=settings.kept_values,
        batch_size=settings.batch_size, max_length=settings.max_length, device=session.device,
        tau_dtype=session.tau_dtype, model_factory=session.model_factory,
        allow_shape_mismatch=session.allow_shape_mismatch, running_stats=session.running_stats,
        fitness=settings.fitness, holdout=settings.holdout, rescore_top=settings.rescore_top,
        autocast=settings.autocast, cpu_linear=settings.cpu_linear)


def prune(session: Session, method: str, *, settings: PruneSettings = PruneSettings(),
          eval_spec: Optional[str] = None, log_path: Optional[Path] = None, resume: bool = False,
          progress: bool = True) -> PruneOutcome:
    """Prune ``session``'s task vector with ``method`` ("nps" or a baseline of ``core.PRUNERS``)
    at ``settings.keep_ratio``. NPS searches on the calibration evaluator ``eval_spec`` (a
    baseline is scored on it when given); ``log_path``: the search's JSONL log, which ``resume``
    continues (only a log of this very run)."""
    tv = session.task_vector
    keep = settings.keep_ratio
    t0 = time.perf_counter()
    if method == "nps":
        if not eval_spec:
            raise NPSError("method 'nps' needs a calibration evaluator (eval_spec)")
        space_name = settings.space
        if space_name == "hybrid" and settings.kept_values != "weighted":
            raise NPSError("kept_values='original' needs space='magnitude' (the hybrid space "
                           "carries its own scales)")
        session.ensure_model()
        evaluator, holdout = session.search_evaluators(
            eval_spec, fitness=settings.fitness, holdout=settings.holdout,
            calib_size=settings.calib_size, holdout_min_rows=settings.holdout_min_rows,
            **settings.evaluator_kwargs())
        choice = holdout_note(settings.holdout, evaluator, holdout, eval_spec,
                               settings.holdout_min_rows)
        prep = session.prepared(settings)
        search = settings.search
        space = make_space(space_name, settings.bands, search.lower, search.upper, search.param,
                           keep_ratio=keep)
        bands_s = time.perf_counter() - t0
        if log_path is not None and Path(log_path).parent.name.endswith(".nps-run"):
            claim_work_dir(Path(log_path).parent, Path(log_path).parent.with_suffix(""))
        # the search holds the model (with θ_pre in it), τ and the band structures: each candidate
        # is written at its k kept entries and restored (no second model-sized copy of θ_pre)
        # --patience-gap, --race-gap, --refine-gap: the fine-tuned model's own score on the
        # search rows, once (also the report's calibration["finetuned"]: same model, same rows)
        # (only where a gap can act: a space that refines, an evaluator a search races over)
        reference = (session.score(evaluator, session.task_vector.values)
                     if (search.patience is not None and search.patience_gap is not None)
                     or (search.race_gap is not None
                         and race_rows(evaluator, search, evaluator.num_rows) is not None)
                     or (search.refine_gap is not None and getattr(space, "refine_rounds", 0) > 0)
                     else None)
        session.park_base()
        scorer = _scorer(session, evaluator, prep, settings, eval_spec,
                         calib_size=evaluator.num_rows if holdout is not None else None)
        try:
            executor = make_executor(settings.executor, workers=settings.workers,
                                     ray_address=settings.ray_address)
            aborted = None
            try:
                run_id = None
                if log_path is not None:    # what resume checks: the log must be of this very run
                    run_id = run_identity(pretrained=session.pretrained, finetuned=session.finetuned,
                                          eval_spec=eval_spec, fields=_identity_fields(session, settings),
                                          method=method)
                    if "holdout_min_rows" in choice:    # the split the hold-out share alone implies is off
                        run_id["holdout_min_rows"] = choice["holdout_min_rows"]
                result = run_search(scorer, settings.bands, search, log_path=log_path, resume=resume,
                                    executor=executor, progress=progress, space=space, run_id=run_id,
                                    calib_rows=evaluator.num_rows,   # what a race races over
                                    reference_score=reference)
            except OSError as e:
                raise write_error(e, log_path, "the search log so far is kept for resuming "
                                  "once there is room") from None
            except SearchAborted as e:
                # keep the best candidate scored so far; the caller writes it and still fails
                if e.result is None or not any(c.get("status") == "ok" for c in e.result.candidates):
                    raise
                result, aborted = e.result, str(e)
            finally:
                executor.close()
            scorer.restore()                    # θ_pre back in the model before re-scoring
            chosen, rescored = None, []
            if holdout is not None and not aborted:
                t_r = time.perf_counter()
                chosen, rescored = rescore_on_holdout(session, prep, result, holdout,
                                                      int(settings.rescore_top), settings.autocast,
                                                      settings.cpu_linear)
                result.best_weights = np.asarray(chosen["weights"], dtype=np.float64)
                result.best_score = float(chosen["score"])
                rescore_s = time.perf_counter() - t_r
            search_peak = peak_rss_bytes()      # the search (and re-scoring) alone, before τ̂ is built
            pruned = prep.build(result.best_weights)    # while the model holds θ_pre: no copy of it yet
        finally:
            scorer.restore()
            # the bands' sorted |τ| and band of each entry, and the hybrid index, are done with:
            # freed before θ_pre is taken back (the outcome keeps the bands' layout only)
            bands = dataclasses.replace(prep.bands, band_of=torch.empty(0, dtype=torch.uint8),
                                        sorted_abs=torch.empty(0))
            scorer = prep = None
            session.unpark_base()
        calib = {"magnitude": result.baseline_score}
        for c in result.candidates:
            if int(c["gen"]) == 0 and c.get("start") not in (None, "magnitude") and c.get("status") == "ok":
                calib[c["start"]] = c["score"]
        calib["nps"] = result.best_score
        outcome = PruneOutcome("nps", pruned, keep, result, bands, calib,
                               {"bands_s": bands_s, "search_s": result.seconds}, aborted,
                               rescored=rescored, space=space_name,
                               memory={"search_peak_rss_bytes": search_peak,
                                       **logits_peak(evaluator, holdout)}, holdout=choice)
        if rescored:
            outcome.timings["rescore_s"] = rescore_s
            outcome.calibration["nps_holdout"] = max(r["holdout_score"] for r in rescored)
        if aborted:
            return outcome
        outcome.calibration["finetuned"] = (reference if reference is not None
                                            else session.score(evaluator, tv.values))
        return outcome
    if method not in PRUNERS:
        raise NPSError(f"unknown pruning method {method!r} (known: nps, {', '.join(PRUNERS)})")
    pruned = prune_in_domain(PRUNERS[method], tv.values, keep, session.domain, seed=settings.seed)
    outcome = PruneOutcome(method, pruned, keep, timings={"prune_s": time.perf_counter() - t0})
    if eval_spec:
        fitness = (session.search_fitness(eval_spec, settings.fitness) if settings.fitness
                   else "accuracy")
        evaluator = session.evaluator(eval_spec, calib_size=settings.calib_size, fitness=fitness,
                                      **settings.evaluator_kwargs())
        outcome.calibration = {"finetuned": session.score(evaluator, tv.values),
                               method: session.score(evaluator, pruned)}
    return outcome


def band_summary(bands) -> Dict[str, Any]:
    if bands is None:
        return {}
    sizes = [bands.starts[i + 1] - bands.starts[i] for i in range(bands.num_bands)]
    return {"scheme": bands.scheme, "num_bands": bands.num_bands, "sizes": sizes}


def search_report(result, outcome=None) -> Dict[str, Any]:
    if result is None:
        return {}
    extra = {}
    if outcome is not None:
        extra = {"space": outcome.space, "rescored": outcome.rescored,
                 **({"holdout": outcome.holdout} if outcome.holdout else {})}
    return {**extra, "best_weights": result.best_weights, "best_score": result.best_score,
            "examples_scored": sum(int(c.get("examples") or 0) for c in result.candidates),
            "baseline_score": result.baseline_score, "stopped_early": result.stopped_early,
            **({"stopped_at": result.stopped_at} if result.stopped_at is not None else {}),  # cost-h
            "generations": result.generations, "candidates": result.candidates,
            "build_s_total": sum(c.get("build_s") or 0.0 for c in result.candidates),
            "eval_s_total": sum(c.get("eval_s") or 0.0 for c in result.candidates),
            "seconds": result.seconds}
