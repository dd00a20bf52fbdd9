"""`nps prune`: one fine-tuned model in, its slim task vector and pruned model out.

The per-task step (:func:`prune_task`) is shared by transfer, merge and compress: load the pair
once, bind the model's weights to one flat buffer, then either search band weights with CMA-ES
(NPS) or apply a baseline pruner, and score what is asked for.
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from ..errors import NPSError
from ..task_vector import TaskVector
from ..report.report import now_iso, versions, write_json


@dataclass
class Session:
    """A fine-tuned model loaded once for scoring: θ_pre, τ, and a model whose prunable weights are
    views into ``flat`` (writing θ into ``flat`` changes the model in place)."""

    pretrained: str
    finetuned: str
    base_flat: torch.Tensor
    task_vector: TaskVector
    model: Any = None
    flat: Optional[torch.Tensor] = None
    model_factory: Optional[str] = None
    device: str = "cpu"
    load_s: float = 0.0

    @classmethod
    def load(cls, pretrained: str, finetuned: str, *, model_factory=None, allow_shape_mismatch=False,
             need_model=True, device="cpu", name=None, tau_dtype="float32",
             running_stats="finetuned") -> "Session":
        """Load θ_pre and τ (τ in ``tau_dtype``; θ_pre then kept in the checkpoint's own 16-bit
        dtype, which is lossless) on ``device``, and the model once if it will be scored."""
        from ..checkpoints import load_task_vector
        t0 = time.perf_counter()
        compact = tau_dtype != "float32"
        base_flat, tv = load_task_vector(pretrained, finetuned, allow_shape_mismatch=allow_shape_mismatch,
                                         name=name, dtype=tau_dtype, running_stats=running_stats,
                                         base_dtype="checkpoint" if compact else "float32",
                                         device=None if device == "cpu" else device)
        s = cls(str(pretrained), str(finetuned), base_flat, tv, model_factory=model_factory, device=device)
        if need_model:
            s.ensure_model()
        s.load_s = time.perf_counter() - t0
        return s

    def ensure_model(self):
        if self.model is None:
            from ..evaluation import bind_flat, load_model
            self.model = load_model(self.finetuned, model_factory=self.model_factory, device=self.device)
            self.flat = bind_flat(self.model, self.task_vector.layout)
            if self.device != "cpu":
                self.base_flat = self.base_flat.to(self.device)
                self.task_vector = self.task_vector.with_values(self.task_vector.values.to(self.device))
        return self.model

    def set_task_values(self, tau: torch.Tensor, scale: float = 1.0) -> None:
        """Put θ_pre + scale·τ into the model (in place).

        Computed as ``θ_pre + (scale·τ)``, the same float arithmetic as the model that is written
        (``TaskVector.state_dict`` of ``scale·τ``), so the scores reported are those of the
        written weights bit for bit (``torch.add(..., alpha=scale)`` rounds differently)."""
        self.ensure_model()
        tau = tau.to(self.flat.device)
        torch.add(self.base_flat, tau if scale == 1.0 else tau * scale, out=self.flat)

    def score(self, evaluator, tau: torch.Tensor, scale: float = 1.0) -> float:
        self.set_task_values(tau, scale)
        return float(evaluator(self.model))

    def evaluator(self, spec: str, opts, *, calib: bool = True, fitness: str = "accuracy",
                  calib_size=None, subset: str = "all", rest_size=None):
        from ..evaluation import make_evaluator
        size = calib_size if calib_size is not None else (
            getattr(opts, "calib_size", None) if calib else None)
        ev = make_evaluator(spec, model_path=self.finetuned, calib_size=size,
                            seed=opts.seed, batch_size=opts.batch_size,
                            device=self.device, max_length=opts.max_length, fitness=fitness,
                            subset=subset, rest_size=rest_size)
        if fitness == "agreement":       # the fine-tuned model's own predictions are the target
            self.set_task_values(self.task_vector.values)
            ev.set_reference(self.model)
        return ev

    @staticmethod
    def search_fitness(spec: str, opts) -> str:
        """The fitness the search uses on ``spec``: ``opts.fitness``, by default loglik for the
        classification evaluators; a python: evaluator's own score ("accuracy" here)."""
        fitness = getattr(opts, "fitness", None)
        if str(spec).split(":", 1)[0].strip().lower() == "python":
            if fitness not in (None, "accuracy"):
                raise NPSError(f"{spec}: --fitness {fitness} applies to the text- and "
                               "image-classification evaluators; a python: evaluator returns its "
                               "own score")
            return "accuracy"
        return fitness or "loglik"

    def search_evaluators(self, spec: str, opts):
        """(search evaluator, held-out evaluator or None) on the calibration data: with
        ``opts.holdout`` = h > 0, the first (1−h) of the seeded calibration rows drive the search
        and the other h re-score its best candidates (against the winner's curse)."""
        from ..evaluation import count_rows
        fitness = self.search_fitness(spec, opts)
        h = float(getattr(opts, "holdout", 0.0) or 0.0)
        if h <= 0 or str(spec).split(":", 1)[0].strip().lower() == "python":
            return self.evaluator(spec, opts, fitness=fitness), None
        total = count_rows(spec)
        n = total if opts.calib_size is None else min(int(opts.calib_size), total)
        n_search = max(1, int(round((1.0 - h) * n)))
        n_hold = n - n_search
        if n_hold < 1 or n_search >= total:
            return self.evaluator(spec, opts, fitness=fitness, calib_size=n), None
        search = self.evaluator(spec, opts, fitness=fitness, calib_size=n_search)
        hold = self.evaluator(spec, opts, fitness=fitness, calib_size=n_search, subset="rest",
                              rest_size=n_hold)
        return search, hold


@dataclass
class PruneOutcome:
    method: str
    pruned: torch.Tensor                       # τ̂, flat
    keep_ratio: float
    search: Any = None                          # SearchResult for nps
    bands: Any = None
    calibration: Dict[str, float] = field(default_factory=dict)
    timings: Dict[str, float] = field(default_factory=dict)
    aborted: Optional[str] = None               # the search stopped on repeated failures
    rescored: List[Dict[str, Any]] = field(default_factory=list)   # held-out re-scoring
    space: str = "magnitude"


def search_settings(opts):
    from ..config import resolved_search_bounds
    from ..search import SearchSettings
    lower, upper, sigma0 = resolved_search_bounds(opts)
    return SearchSettings(generations=opts.generations, sigma0=sigma0, lower=lower, upper=upper,
                          popsize=opts.popsize, seed=opts.seed, param=opts.param,
                          max_failures=opts.max_failures, space=getattr(opts, "space", "magnitude"),
                          # cost-h: the cheaper-search settings (issue 16), off by default
                          **{k: getattr(opts, k) for k in _COST_SETTINGS if hasattr(opts, k)})


_COST_SETTINGS = ("patience", "race", "race_min_rows", "race_eta", "race_z")   # cost-h


def _scorer(session: Session, evaluator, bands, opts, eval_spec: str, index=None,
            calib_size=None):
    from ..search.scorer import CandidateScorer
    space = getattr(opts, "space", "magnitude")
    if opts.executor == "serial":
        return CandidateScorer.from_state(session.base_flat, session.task_vector, bands, session.model,
                                          session.flat, evaluator, opts.keep, opts.kept_values,
                                          space=space, index=index)
    return CandidateScorer(pretrained_path=session.pretrained, finetuned_path=session.finetuned,
                           eval_spec=eval_spec, keep_ratio=opts.keep, num_bands=opts.bands,
                           scheme=opts.scheme, focus=opts.focus, kept_values=opts.kept_values,
                           calib_size=calib_size if calib_size is not None else opts.calib_size,
                           seed=opts.seed, model_factory=opts.model_factory,
                           device=opts.device, batch_size=opts.batch_size, tau_dtype=opts.tau_dtype,
                           space=space, fitness=session.search_fitness(eval_spec, opts),
                           max_length=opts.max_length, running_stats=opts.running_stats,
                           allow_shape_mismatch=opts.allow_shape_mismatch)


def rescore_on_holdout(session: Session, space, bands, index, result, holdout, keep: float,
                       top: int, kept_values: str = "weighted"):
    """Against the winner's curse: re-score the generation-0 start points and the ``top`` best
    distinct candidates of the search on held-out calibration rows; return (chosen record,
    rows). The chosen one has the best held-out score (ties: the better search score, then the
    earlier candidate)."""
    from ..core.space import build_point
    ok = [c for c in result.candidates if c.get("status") == "ok" and c.get("score") is not None]
    pool, seen = [], set()
    starts = [c for c in ok if int(c["gen"]) == 0]
    ranked = sorted((c for c in ok if int(c["gen"]) > 0), key=lambda c: -c["score"])
    for c in starts + ranked:
        key = tuple(round(float(v), 12) for v in c["weights"])
        if key in seen:
            continue
        seen.add(key)
        pool.append(c)
        if len(pool) >= len(starts) + top:
            break
    rows = []
    session.ensure_model()
    for c in pool:
        w = np.asarray(c["weights"], dtype=np.float64)
        build_point(space, session.task_vector.values, bands, index, w, keep,
                    base=session.base_flat, out=session.flat, kept_values=kept_values)
        with torch.no_grad():
            hs = float(holdout(session.model))
        rows.append({"gen": int(c["gen"]), "idx": int(c["idx"]), "weights": c["weights"],
                     "search_score": c["score"], "holdout_score": hs, "start": c.get("start")})
    best = max(range(len(rows)), key=lambda i: (rows[i]["holdout_score"], rows[i]["search_score"], -i))
    return pool[best], rows


def prune_task(session: Session, method: str, opts, *, eval_spec: Optional[str] = None,
               log_path: Optional[Path] = None, progress: bool = True) -> PruneOutcome:
    """Prune ``session``'s task vector with ``method`` at ``opts.keep``; NPS searches on ``eval_spec``."""
    tv = session.task_vector
    t0 = time.perf_counter()
    if method == "nps":
        from ..core import make_bands
        from ..core.space import build_point, make_hybrid_index, make_space
        from ..search import run_search
        from ..search.executors import make_executor
        if not eval_spec:
            raise NPSError("--method nps needs a calibration evaluator (--eval SPEC)")
        space_name = getattr(opts, "space", "magnitude")
        if space_name == "hybrid" and opts.kept_values != "weighted":
            raise NPSError("--kept-values original needs --space magnitude (the hybrid space "
                           "carries its own scales)")
        session.ensure_model()
        evaluator, holdout = session.search_evaluators(eval_spec, opts)
        bands = make_bands(tv.values, opts.bands, opts.scheme, opts.keep, opts.focus,
                           sorted_dtype=tv.values.dtype if tv.values.dtype != torch.float64 else torch.float32)
        index = make_hybrid_index(tv.values, opts.seed) if space_name == "hybrid" else None
        settings = search_settings(opts)
        space = make_space(space_name, opts.bands, settings.lower, settings.upper, settings.param,
                           keep_ratio=opts.keep)
        bands_s = time.perf_counter() - t0
        from ..search.cmaes_search import SearchAborted
        if log_path is not None and Path(log_path).parent.name.endswith(".nps-run"):
            from ..workdirs import claim_work_dir     # our work folder: made with its marker
            claim_work_dir(Path(log_path).parent, Path(log_path).parent.with_suffix(""))
        executor = make_executor(opts.executor, workers=opts.workers, ray_address=opts.ray_address)
        aborted = None
        try:
            run_id = None
            if log_path is not None:    # what --resume checks: the log must be of this very run
                from ..search.identity import run_identity
                run_id = run_identity(pretrained=session.pretrained, finetuned=session.finetuned,
                                      eval_spec=eval_spec, opts=opts, method=method)
            result = run_search(_scorer(session, evaluator, bands, opts, eval_spec, index,
                                        calib_size=evaluator.num_rows if holdout is not None else None),
                                opts.bands, settings, log_path=log_path, resume=opts.resume,
                                executor=executor, progress=progress, space=space, run_id=run_id,
                                calib_rows=evaluator.num_rows)   # cost-h: what --race races over
        except OSError as e:
            from ..paths import write_error
            raise write_error(e, log_path, "the search log so far is kept for --resume "
                              "once there is room") from None
        except SearchAborted as e:
            # keep the best candidate scored so far; the caller writes it and still fails
            if e.result is None or not any(c.get("status") == "ok" for c in e.result.candidates):
                raise
            result, aborted = e.result, str(e)
        finally:
            executor.close()
        chosen, rescored = None, []
        if holdout is not None and not aborted:
            t_r = time.perf_counter()
            chosen, rescored = rescore_on_holdout(session, space, bands, index, result, holdout,
                                                  opts.keep, int(getattr(opts, "rescore_top", 5)),
                                                  opts.kept_values)
            result.best_weights = np.asarray(chosen["weights"], dtype=np.float64)
            result.best_score = float(chosen["score"])
            rescore_s = time.perf_counter() - t_r
        pruned = build_point(space, tv.values, bands, index, np.asarray(result.best_weights),
                             opts.keep, kept_values=opts.kept_values)
        calib = {"magnitude": result.baseline_score}
        for c in result.candidates:
            if int(c["gen"]) == 0 and c.get("start") not in (None, "magnitude") and c.get("status") == "ok":
                calib[c["start"]] = c["score"]
        calib["nps"] = result.best_score
        outcome = PruneOutcome("nps", pruned, opts.keep, result, bands, calib,
                               {"bands_s": bands_s, "search_s": result.seconds}, aborted,
                               rescored=rescored, space=space_name)
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
    pruned = PRUNERS[method](tv.values, opts.keep, seed=opts.seed)
    outcome = PruneOutcome(method, pruned, opts.keep, timings={"prune_s": time.perf_counter() - t0})
    if eval_spec:
        fitness = (session.search_fitness(eval_spec, opts) if getattr(opts, "fitness", None)
                   else "accuracy")
        evaluator = session.evaluator(eval_spec, opts, fitness=fitness)
        outcome.calibration = {"finetuned": session.score(evaluator, tv.values),
                               method: session.score(evaluator, pruned)}
    return outcome


def work_dir(output: str | Path) -> Path:
    """Where a search keeps its log until the output appears (what --resume reads)."""
    out = Path(output)
    return out.with_name(out.name + ".nps-run")


def prepare_work_dir(output, resume: bool, inputs, *, check_output: bool = True) -> Path:
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
        extra = {"space": outcome.space, "rescored": outcome.rescored}
    return {**extra, "best_weights": result.best_weights, "best_score": result.best_score,
            "examples_scored": sum(int(c.get("examples") or 0) for c in result.candidates),
            "baseline_score": result.baseline_score, "stopped_early": result.stopped_early,
            **({"stopped_at": result.stopped_at} if result.stopped_at is not None else {}),  # cost-h
            "generations": result.generations, "candidates": result.candidates,
            "build_s_total": sum(c.get("build_s") or 0.0 for c in result.candidates),
            "eval_s_total": sum(c.get("eval_s") or 0.0 for c in result.candidates),
            "seconds": result.seconds}


def run_prune(opts) -> Dict[str, Any]:
    from ..checkpoints import open_checkpoint, save_model_folder, save_tensors
    from ..checkpoints.save import atomic_output_dir
    t_start = time.perf_counter()
    inputs = [opts.pretrained, opts.finetuned]
    wd = prepare_work_dir(opts.output, opts.resume, inputs)
    session = Session.load(opts.pretrained, opts.finetuned, model_factory=opts.model_factory,
                           allow_shape_mismatch=opts.allow_shape_mismatch,
                           running_stats=opts.running_stats,
                           need_model=bool(opts.eval or opts.test or opts.method == "nps"),
                           device=opts.device, tau_dtype=opts.tau_dtype)
    tv = session.task_vector
    outcome = prune_task(session, opts.method, opts, eval_spec=opts.eval, log_path=wd / "search.jsonl",
                         progress=not opts.quiet)
    test_scores: Dict[str, float] = {}
    if opts.test:
        test_eval = session.evaluator(opts.test, opts, calib=False)
        test_scores["finetuned"] = session.score(test_eval, tv.values)
        if opts.method == "nps":
            from ..core import PRUNERS
            test_scores["magnitude"] = session.score(test_eval, PRUNERS["magnitude"](tv.values, opts.keep))
            if getattr(opts, "space", "magnitude") == "hybrid":
                test_scores["dare"] = session.score(test_eval, PRUNERS["dare"](tv.values, opts.keep,
                                                                              seed=opts.seed))
        test_scores[opts.method] = session.score(test_eval, outcome.pruned)
    report = {
        "command": "prune", "created": now_iso(), "settings": dataclasses.asdict(opts),
        "seed": opts.seed, "versions": versions(),
        "model": {"num_entries": tv.num_entries, "kept": int(torch.count_nonzero(outcome.pruned)),
                  "keep_ratio": opts.keep, "task_specific": sorted(tv.task_specific),
                  "buffers": sorted(tv.buffers), "num_tensors": len(tv.layout.names)},
        "bands": band_summary(outcome.bands), "search": search_report(outcome.search, outcome),
        "search_settings": search_settings(opts).to_dict() if opts.method == "nps" else None,
        "calibration": outcome.calibration, "test": test_scores,
        "timings": {"load_s": session.load_s, **outcome.timings,
                    "total_s": time.perf_counter() - t_start},
    }
    pruned_tv = tv.with_values(outcome.pruned.cpu())
    base_cpu = session.base_flat.cpu().float()   # the written model is computed in float32
    with atomic_output_dir(opts.output, inputs=inputs) as tmp:
        save_model_folder(tmp, pruned_tv.state_dict(base_cpu), like=open_checkpoint(opts.finetuned),
                          inputs=inputs)
        save_tensors(tmp / "task_vector.safetensors",
                     {k: v.contiguous() for k, v in pruned_tv.items()},
                     metadata={"method": opts.method, "keep_ratio": str(opts.keep)})
        write_json(tmp / "report.json", report)
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


def _print_summary(report: Dict[str, Any]) -> None:
    m = report["model"]
    print(f"kept {m['kept']:,} of {m['num_entries']:,} prunable entries "
          f"({m['keep_ratio']:.2%}); task-specific tensors kept whole: {len(m['task_specific'])}")
    for split in ("calibration", "test"):
        if report[split]:
            row = "  ".join(f"{k} {v:.4f}" for k, v in report[split].items())
            print(f"{split:12s} {row}")
    print(f"wrote {report['settings']['output']}")
