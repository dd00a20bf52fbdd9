"""`nps prune`: one fine-tuned model in, its slim task vector and pruned model out.

The per-task step (:func:`prune`, the library's entry point) is shared by transfer, merge,
compress and the benchmark: on a :class:`~.session.Session` (the pair loaded once, the model's
weights bound to one flat buffer) it either searches band weights with CMA-ES (NPS) or applies a
baseline pruner, and scores what is asked for; what it does is a :class:`~.settings.PruneSettings`.
:func:`run_prune` is the command: it maps the options to settings (``PruneSettings.from_options``),
calls :func:`prune` and writes the output folder.
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from ..checkpoints.external import input_sources
from ..errors import NPSError
from ..report.report import now_iso, peak_rss_bytes, versions, write_json
from .holdout import holdout_finalists, holdout_note, logits_peak, rescore_on_holdout
from .session import Session
from .settings import PruneSettings, SearchSettings, search_settings_from_options

__all__ = ["Session", "PruneSettings", "SearchSettings", "PruneOutcome", "prune",
           "rescore_on_holdout", "holdout_finalists", "prune_task", "search_settings", "run_prune"]


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


def search_settings(opts):
    """The CMA-ES settings of a CLI options object (the CLI's mapping: see
    :meth:`PruneSettings.from_options`)."""
    return search_settings_from_options(opts)


def _scorer(session: Session, evaluator, prep, settings: PruneSettings, eval_spec: str,
            calib_size=None):
    from ..search.scorer import CandidateScorer
    if settings.executor == "serial":
        return CandidateScorer.from_state(session.base_flat, prep, session.model, session.flat,
                                          evaluator, autocast=settings.autocast)
    # worker processes load the pair from its paths, the way the session was loaded
    return CandidateScorer(pretrained_path=session.pretrained, finetuned_path=session.finetuned,
                           eval_spec=eval_spec, keep_ratio=settings.keep_ratio,
                           num_bands=settings.bands, scheme=settings.scheme, focus=settings.focus,
                           kept_values=settings.kept_values,
                           calib_size=calib_size if calib_size is not None else settings.calib_size,
                           seed=settings.seed, model_factory=session.model_factory,
                           device=session.device, batch_size=settings.batch_size,
                           tau_dtype=session.tau_dtype, space=settings.space,
                           fitness=session.search_fitness(eval_spec, settings.fitness),
                           max_length=settings.max_length, running_stats=session.running_stats,
                           allow_shape_mismatch=session.allow_shape_mismatch,
                           autocast=settings.autocast)


def _identity_fields(session: Session, settings: PruneSettings) -> SimpleNamespace:
    """What :func:`~nps_pruning.search.identity.run_identity` reads, under the names the search
    logs' headers have always used (so a log written before resumes)."""
    return SimpleNamespace(
        calib_size=settings.calib_size, keep=settings.keep_ratio, bands=settings.bands,
        scheme=settings.scheme, focus=settings.focus, kept_values=settings.kept_values,
        batch_size=settings.batch_size, max_length=settings.max_length, device=session.device,
        tau_dtype=session.tau_dtype, model_factory=session.model_factory,
        allow_shape_mismatch=session.allow_shape_mismatch, running_stats=session.running_stats,
        fitness=settings.fitness, holdout=settings.holdout, rescore_top=settings.rescore_top,
        autocast=settings.autocast)


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
        from ..core.space import make_space
        from ..search import run_search
        from ..search.executors import make_executor
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
        from ..search.cmaes_search import SearchAborted
        if log_path is not None and Path(log_path).parent.name.endswith(".nps-run"):
            from ..workdirs import claim_work_dir     # our work folder: made with its marker
            claim_work_dir(Path(log_path).parent, Path(log_path).parent.with_suffix(""))
        # the search holds the model (with θ_pre in it), τ and the band structures: each candidate
        # is written at its k kept entries and restored (no second model-sized copy of θ_pre)
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
                    from ..search.identity import run_identity
                    run_id = run_identity(pretrained=session.pretrained, finetuned=session.finetuned,
                                          eval_spec=eval_spec, opts=_identity_fields(session, settings),
                                          method=method)
                    if "holdout_min_rows" in choice:    # the split the hold-out share alone implies is off
                        run_id["holdout_min_rows"] = choice["holdout_min_rows"]
                result = run_search(scorer, settings.bands, search, log_path=log_path, resume=resume,
                                    executor=executor, progress=progress, space=space, run_id=run_id,
                                    calib_rows=evaluator.num_rows)   # what a race races over
            except OSError as e:
                from ..paths import write_error
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
                                                      int(settings.rescore_top), settings.autocast)
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
        outcome.calibration["finetuned"] = session.score(evaluator, tv.values)
        return outcome
    from ..core import PRUNERS
    if method not in PRUNERS:
        raise NPSError(f"unknown pruning method {method!r} (known: nps, {', '.join(PRUNERS)})")
    from ..core.prepared import prune_in_domain
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


def check_prune_options(method: str, opts, eval_spec: Optional[str]) -> None:
    """What :func:`prune` refuses, said in the CLI's flags (checked before it runs)."""
    if method == "nps" and not eval_spec:
        raise NPSError("--method nps needs a calibration evaluator (--eval SPEC)")
    if method == "nps" and opts.space == "hybrid" and opts.kept_values != "weighted":
        raise NPSError("--kept-values original needs --space magnitude (the hybrid space "
                       "carries its own scales)")


def prune_task(session: Session, method: str, opts, *, eval_spec: Optional[str] = None,
               log_path: Optional[Path] = None, progress: bool = True) -> PruneOutcome:
    """The CLI's form of :func:`prune` (kept for callers of earlier versions): the settings of the
    options object ``opts``, its ``resume``; the errors name the CLI's flags."""
    check_prune_options(method, opts, eval_spec)
    return prune(session, method, settings=PruneSettings.from_options(opts), eval_spec=eval_spec,
                 log_path=log_path, resume=bool(opts.resume), progress=progress)


def work_dir(output: str | Path) -> Path:
    """Where a search keeps its log until the output appears (what --resume reads)."""
    out = Path(output)
    return out.with_name(out.name + ".nps-run")


def prepare_work_dir(output, resume: bool, inputs, *, check_output: bool = True,
                     searches: bool = True) -> Path:
    """Check the output against the inputs (and, with ``check_output``, that an existing output
    may be replaced) before any work, and return the work folder. The folder is created, with its
    ownership marker, just before a search writes its log (:func:`prune_task`), so a run that
    fails before any search leaves nothing behind; a folder of that name that nps did not make
    is refused, never removed (:mod:`nps_pruning.workdirs`)."""
    from ..checkpoints.save import check_output_dir
    from ..workdirs import check_work_dir, release_work_dir
    wd = work_dir(output)
    o = Path(output).resolve()
    for p in inputs:
        p = Path(p).resolve()
        if o == p or p in o.parents:
            raise NPSError(f"{output}: refusing to write inside an input ({p})")
        if o in p.parents:
            raise NPSError(f"{output}: refusing to write over a folder that holds an input ({p})")
    if check_output:
        check_output_dir(output, inputs=inputs)
    check_work_dir(wd, resume=resume, inputs=inputs)
    if resume and not searches:
        raise NPSError("--resume continues an NPS search from its log, and this method runs no "
                       "search: rerun without --resume (another run's log is never taken over)")
    # prune/transfer log to search.jsonl, merge/compress to one search-<task>.jsonl per task
    if resume and not any(wd.glob("search*.jsonl")):
        raise NPSError(f"{wd / 'search.jsonl'}: no search log to resume from")
    if wd.exists() and not resume:
        release_work_dir(wd)
        check_work_dir(wd, resume=resume, inputs=inputs)   # it held files nps did not write
    return wd


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


def _given(opts, field: str) -> str:
    """The input as the user gave it (a GGUF file or LoRA adapter, not its converted folder)."""
    from ..checkpoints.external import CONVERSIONS
    value = str(getattr(opts, field))
    conv = CONVERSIONS.get(value) or {}
    return conv.get("hub_id") or conv.get("file") or conv.get("adapter") or value


def run_prune(opts) -> Dict[str, Any]:
    from ..checkpoints import open_checkpoint, save_model_folder, save_sparse_tensors
    from ..checkpoints.save import atomic_output_dir
    t_start = time.perf_counter()
    inputs = [opts.pretrained, opts.finetuned]
    wd = prepare_work_dir(opts.output, opts.resume, inputs, searches=opts.method == "nps")
    session = Session.load(opts.pretrained, opts.finetuned, model_factory=opts.model_factory,
                           allow_shape_mismatch=opts.allow_shape_mismatch,
                           running_stats=opts.running_stats,
                           need_model=bool(opts.eval or opts.test or opts.method == "nps"),
                           device=opts.device, tau_dtype=opts.tau_dtype)
    tv = session.task_vector
    settings = PruneSettings.from_options(opts)
    outcome = prune_task(session, opts.method, opts, eval_spec=opts.eval, log_path=wd / "search.jsonl",
                         progress=not opts.quiet)
    test_scores: Dict[str, float] = {}
    if opts.test:
        test_eval = session.evaluator(opts.test, seed=opts.seed, batch_size=opts.batch_size,
                                      max_length=opts.max_length)
        test_scores["finetuned"] = session.score(test_eval, tv.values)
        if opts.method == "nps":
            from ..core import PRUNERS
            from ..core.prepared import prune_in_domain
            for m in ("magnitude", "dare") if settings.space == "hybrid" else ("magnitude",):
                test_scores[m] = session.score(test_eval, prune_in_domain(
                    PRUNERS[m], tv.values, opts.keep, session.domain, seed=opts.seed))
        test_scores[opts.method] = session.score(test_eval, outcome.pruned)
    report = {
        "command": "prune", "created": now_iso(), "settings": dataclasses.asdict(opts),
        "inputs": input_sources(opts),
        "seed": opts.seed, "versions": versions(),
        "model": {"num_entries": session.domain.count, "kept": int(torch.count_nonzero(outcome.pruned)),
                  "keep_ratio": opts.keep, **_unchanged_report(session),
                  "task_specific": sorted(tv.task_specific),
                  "buffers": sorted(tv.buffers), "num_tensors": len(tv.layout.names)},
        "bands": band_summary(outcome.bands), "search": search_report(outcome.search, outcome),
        "search_settings": settings.search.to_dict() if opts.method == "nps" else None,
        "calibration": outcome.calibration, "test": test_scores,
        "timings": {"load_s": session.load_s, **outcome.timings,
                    "total_s": time.perf_counter() - t_start},
        # peak resident memory: of the search (θ_pre, τ, the model, the bands, the space's index),
        # and of the command before it writes (+ the pruned τ̂); writing frees the model first
        "memory": {**outcome.memory, "peak_rss_bytes": peak_rss_bytes()},
    }
    # the scoring model and the search's bands are done with: free them before the written model
    # is computed, so that writing does not raise the command's peak memory
    outcome.bands = None
    session.release_model()
    pruned_tv = tv.with_values(outcome.pruned.cpu())
    base_cpu = session.base_flat.cpu().float()   # the written model is computed in float32
    session.base_flat = None                     # θ is computed into it: its last use
    with atomic_output_dir(opts.output, inputs=inputs) as tmp:
        save_model_folder(tmp, pruned_tv.state_dict(base_cpu, in_place=True),
                          like=open_checkpoint(opts.finetuned), inputs=inputs)
        # τ̂ sparse: a non-zero mask (1 bit an entry) and the kept values (checkpoints/sparse.py)
        save_sparse_tensors(tmp / "task_vector.safetensors", dict(pruned_tv.items()),
                            metadata={"method": opts.method, "keep_ratio": str(opts.keep)})
        write_json(tmp / "report.json", report)
        from ..report.model_card import write_model_card
        write_model_card(tmp, kind="pruned", name=Path(opts.output).name, pretrained=_given(opts, "pretrained"),
                         method=opts.method, keep=opts.keep,
                         settings={"bands": opts.bands, "space": opts.space, "fitness": opts.fitness,
                                   "seed": opts.seed} if opts.method == "nps" else {"seed": opts.seed},
                         calibration=report["calibration"], test=report["test"])
        if outcome.search is not None:
            from ..report.plots import plot_search
            plot_search(outcome.search, tmp / "search.png",
                        title=f"NPS search: {tv.name}, keep {opts.keep:g}, {opts.bands} bands")
            shutil.copy2(wd / "search.jsonl", tmp / "search.jsonl")
    if outcome.aborted:
        # the log stays next to the output so that --resume can go on from it
        raise NPSError(f"{outcome.aborted}; the best candidate so far was written to {opts.output} "
                       "(report.json: search.stopped_early); fix the cause and rerun with --resume")
    from ..workdirs import release_work_dir
    release_work_dir(wd)
    if not opts.quiet:
        _print_summary(report)
    return report


def _unchanged_report(session: Session) -> Dict[str, Any]:
    """report.json's word on the tensors the fine-tune left unchanged (τ identically zero): they
    are not in D (``num_entries``), never pruned, and written as they are (θ_pre = θ_ft there)."""
    names = session.unchanged_tensors()
    if not names:
        return {}
    return {"unchanged_tensors": names,
            "unchanged_entries": session.task_vector.num_entries - session.domain.count}


def _print_summary(report: Dict[str, Any]) -> None:
    m = report["model"]
    share = m["kept"] / m["num_entries"] if m["num_entries"] else 0.0
    print(f"kept {m['kept']:,} of {m['num_entries']:,} prunable entries "
          f"({share:.2%}); task-specific tensors kept whole: {len(m['task_specific'])}")
    if m.get("unchanged_tensors"):
        print(f"unchanged by the fine-tune, left as they are (not in D): "
              f"{len(m['unchanged_tensors'])} tensors, {m['unchanged_entries']:,} entries")
    for split in ("calibration", "test"):
        if report[split]:
            row = "  ".join(f"{k} {v:.4f}" for k, v in report[split].items())
            print(f"{split:12s} {row}")
    print(f"wrote {report['settings']['output']}")
