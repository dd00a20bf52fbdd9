"""`nps merge` (Eq. 7 and the baselines): several fine-tuned models of one pre-trained model → one.

Output layout: the merged body is shared, but each task keeps its own task-specific tensors (its
classification head), so the output holds one loadable model folder per task::

    OUT/report.json            settings, λ, every score
    OUT/merged_task_vector.safetensors   the merged τ (prunable tensors only)
    OUT/<task>/                a `from_pretrained` folder: merged body + that task's head
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

import numpy as np
import torch

from ..checkpoints.external import input_sources
from ..errors import NPSError
from ..paths import check_name, safe_child
from ..report.report import now_iso, peak_rss_bytes, versions, write_json
from ..search.grid import grid_search
from ..task_vector import stack_values
from .prune import Session, prepare_work_dir, prune_task, search_report
from .settings import MergeSettings


# files `nps merge` writes next to the task folders (a task may not be named like one)
MERGE_OUTPUT_FILES = ("report.json", "merged_task_vector.safetensors", ".nps-output")


def task_names(paths: Sequence[str], names: Sequence[str], *,
               reserved: Sequence[str] = ()) -> List[str]:
    """One name per model: ``--names`` or each folder's name. A name becomes a folder (merge) and
    a search log name, so it must be one plain path component and not a name in ``reserved``."""
    if names:
        if len(names) != len(paths):
            raise NPSError(f"--names gives {len(names)} names for {len(paths)} models")
        out = list(names)
        what = "--names"
    else:
        out = [Path(p).stem if Path(p).is_file() else Path(p).resolve().name for p in paths]
        what = "task name (from the model's folder name; pass --names)"
    for name in out:
        check_name(name, what=what, reserved=reserved)
    folded = [n.casefold() for n in out]
    if len(set(folded)) != len(folded):
        raise NPSError(f"task names are not unique: {out}; pass --names")
    return out


def merged_scores(sessions: Sequence[Session], evaluators: Sequence[Callable],
                  merged: torch.Tensor) -> List[float]:
    """Each task's score of θ_pre + merged τ with that task's own head."""
    return [s.score(ev, merged) for s, ev in zip(sessions, evaluators)]


def nps_merge_lambdas(sessions, evaluators, pruned: torch.Tensor, *,
                      settings: MergeSettings = MergeSettings(), progress=True):
    """λ for Eq. 7: the best single λ of ``settings.lambda_grid``, then CMA-ES over per-task λ_i
    started from it (parametrised as λ_i = λ*·w_i so that w = 1 is the grid's best and is always
    scored). Returns (λ_i, grid rows, the CMA-ES SearchResult or None)."""
    from ..core.merge import nps_combine
    from ..search import SearchSettings, run_search
    n = len(sessions)
    lambda_grid = list(settings.lambda_grid)

    def mean_score(lambdas) -> float:
        return float(np.mean(merged_scores(sessions, evaluators,
                                           nps_combine(pruned, list(lambdas), settings.normalize,
                                                       settings.collide))))

    choice = grid_search(lambda_grid, lambda lam: mean_score([lam] * n), what="lambda_grid")
    grid = [{"lambda": lam, "score": score} for lam, score in zip(lambda_grid, choice.scores)]
    lam_star = choice.value
    result = None
    lambdas = [lam_star] * n
    if settings.lambda_generations > 0 and n > 1:
        def scorer(w):
            t0 = time.perf_counter()
            return mean_score(lam_star * np.asarray(w)), {"build_s": 0.0, "eval_s": time.perf_counter() - t0}
        upper = max(lambda_grid) * 1.5 / lam_star
        # the per-task λ search: a plain box over λ_i/λ* (the "magnitude" space: one weight per
        # task, no extra coordinates), not the band-weight search's defaults
        search = SearchSettings(generations=settings.lambda_generations, sigma0=0.2, lower=0.0,
                                upper=upper, seed=settings.seed, max_failures=settings.max_failures,
                                space="magnitude")
        result = run_search(scorer, n, search, progress=progress)
        lambdas = [lam_star * float(w) for w in result.best_weights]
    return lambdas, grid, result


@dataclass
class TaskPoint:
    """One task's NPS result as the merge-aware search needs it: its search space (with the
    bounds the joint search moves in), the prepared τ it decodes in
    (:class:`~nps_pruning.core.prepared.Prepared`: domain, bands, hybrid index, keep ratio) and
    the chosen point (parameter units)."""

    space: Any
    prepared: Any
    params: np.ndarray


def task_point(session: Session, outcome, settings) -> TaskPoint:
    """The :class:`TaskPoint` of a per-task NPS outcome (``settings``: its PruneSettings): the
    prepared τ rebuilt from the settings (deterministic: the very bands and seeded order the
    search decoded with; a prune frees them once its τ̂ is built)."""
    from ..core.space import make_space
    search = settings.search
    space = make_space(outcome.space, settings.bands, search.lower, search.upper, search.param,
                       keep_ratio=outcome.keep_ratio)
    return TaskPoint(space, session.prepared(settings.replace(keep_ratio=outcome.keep_ratio)),
                     np.asarray(outcome.search.best_weights, dtype=np.float64))


def joint_nps_merge(sessions, evaluators, points: Sequence[TaskPoint], lambdas0: Sequence[float], *,
                    settings: MergeSettings = MergeSettings(), sigma0: float = 0.15,
                    popsize=None, log_path=None, progress=True):
    """Merge-aware NPS: CMA-ES over every task's search-space point and the λ_i together
    (:class:`~nps_pruning.core.joint_space.JointSpace`), each candidate scored as the merged model's
    mean calibration score over the tasks (``evaluators``: any fitness), for
    ``settings.joint_generations`` generations, started from the two-stage result (``points``,
    ``lambdas0``), which generation 0 scores: the result is never worse than it on this score.
    ``sigma0``: the initial step in search coordinates (a local refinement). Returns
    (pruned (N, D), λ_i, the SearchResult)."""
    from ..core.merge import nps_combine
    from ..core.joint_space import JointSpace
    from ..search import SearchSettings, run_search
    space = JointSpace([p.space for p in points], [p.params for p in points], lambdas0)

    def build(params):
        per_task, lambdas = space.unpack(params)
        pruned = torch.stack([p.prepared.build(w) for p, w in zip(points, per_task)])
        return pruned, [float(v) for v in lambdas]

    def scorer(params):
        t0 = time.perf_counter()
        pruned, lambdas = build(params)
        merged = nps_combine(pruned, lambdas, settings.normalize, settings.collide)
        t1 = time.perf_counter()
        score = float(np.mean(merged_scores(sessions, evaluators, merged)))
        return score, {"build_s": t1 - t0, "eval_s": time.perf_counter() - t1, "examples": rows}

    rows = sum(int(getattr(ev, "num_rows", 0) or 0) for ev in evaluators)   # per candidate

    search = SearchSettings(generations=int(settings.joint_generations), sigma0=float(sigma0),
                            seed=settings.seed, max_failures=settings.max_failures, space="joint",
                            popsize=popsize)
    result = run_search(scorer, space.dim, search, space=space, log_path=log_path, progress=progress)
    pruned, lambdas = build(result.best_weights)
    return pruned, lambdas, result


def merge_with_lambda_grid(method: str, taus: torch.Tensor, sessions, evaluators, *,
                           settings: MergeSettings = MergeSettings()):
    """Merge ``taus`` with ``core.merge.MERGERS[method]`` at the λ of ``settings.lambda_grid``
    whose merged model scores best (weight averaging has no λ). Returns (merged τ, λ, grid rows)."""
    from ..core.merge import merge, needs_shapes
    wants_shapes = needs_shapes(method) or settings.trim == "layer"     # TIES' per-tensor trim
    shapes = sessions[0].task_vector.layout.shapes if wants_shapes and sessions else None
    if method == "average":
        merged = merge(method, taus, lam=1.0, keep_ratio=settings.keep_ratio, seed=settings.seed)
        return merged, None, []

    def score(lam):           # the best λ's merged τ is kept, not built again
        merged = merge(method, taus, lam=lam, keep_ratio=settings.keep_ratio, seed=settings.seed,
                       shapes=shapes, collide=settings.collide, trim=settings.trim,
                       matrices=settings.matrices)
        return float(np.mean(merged_scores(sessions, evaluators, merged))), merged

    lambda_grid = list(settings.lambda_grid)
    choice = grid_search(lambda_grid, score, what="lambda_grid")
    grid = [{"lambda": lam, "score": s} for lam, s in zip(lambda_grid, choice.scores)]
    return choice.extra, choice.value, grid


def _check_merge_options(opts) -> None:
    """The options that only some methods take, refused clearly for the others."""
    from ..core.merge import option_problem
    problem = option_problem(opts.method, opts.collide, opts.trim, flag=lambda name: f"--{name}")
    if problem:
        raise NPSError(problem)
    if getattr(opts, "svd_matrices", "2d") != "2d" and opts.method not in ("tsv-m", "iso-c"):
        raise NPSError(f"--svd-matrices applies to --method tsv-m and iso-c, not {opts.method}")
    if opts.joint_generations and opts.method != "nps":
        raise NPSError("--joint-generations is the merge-aware search of --method nps")
    if opts.joint_generations and opts.lam is not None:
        raise NPSError("--joint-generations searches the λ_i: do not fix --lambda")


def share_base(sessions: Sequence[Session]) -> None:
    """Let every session use the first one's θ_pre when both read the same pre-trained model in
    the same layout (a merge's tasks always do): the copies they loaded (or took back after a
    search, :meth:`Session.unpark_base`) are freed, so a merge of N tasks holds θ_pre once.
    Compared value for value, so a different base is never shared."""
    first = sessions[0]
    for s in sessions[1:]:
        if (first.base_flat is None or s.base_flat is None or s.base_flat is first.base_flat):
            continue
        if (s.pretrained == first.pretrained and s.task_vector.layout == first.task_vector.layout
                and s.base_flat.dtype == first.base_flat.dtype
                and s.base_flat.device == first.base_flat.device
                and torch.equal(s.base_flat, first.base_flat)):
            s.base_flat = first.base_flat


def share_models(sessions: Sequence[Session]) -> None:
    """Load the scoring model once for all sessions whose models differ only in their prunable
    weights (:meth:`Session.can_share_model`: the causal LMs a merge of LoRA adapters or full
    fine-tunes gives); a session with a head of its own loads its own model."""
    for i, s in enumerate(sessions):
        donor = next((d for d in sessions[:i] if d.model is not None and s.can_share_model(d)), None)
        if donor is not None:
            s.use_model_of(donor)
        else:
            s.ensure_model()


def stack_task_vectors(sessions: Sequence[Session]) -> torch.Tensor:
    """The (N, D) matrix of the sessions' τ, filled row by row; each session's τ then becomes a view
    of its row, so the merge holds the N task vectors once (not once in the sessions and again in
    the matrix) and the copy's peak is one task vector, not N."""
    for s in sessions[1:]:
        sessions[0].task_vector._check_same_layout(s.task_vector)
    v0 = sessions[0].task_vector.values
    taus = torch.empty((len(sessions), v0.numel()), dtype=v0.dtype, device=v0.device)
    del v0
    for i, s in enumerate(sessions):     # no list of the original τ: each is freed once copied
        taus[i].copy_(s.task_vector.values)
        s.task_vector = s.task_vector.with_values(taus[i])   # the session's τ is the row
    return taus


def check_finite_model(base: torch.Tensor, tau: torch.Tensor, what: str,
                       chunk: int = 1 << 24) -> None:
    """Refuse to write θ_pre + τ when an entry is NaN or infinite (an overflowing λ, say): such a
    model would be written with exit 0 and be useless. Checked in chunks (no model-sized copy)."""
    bad = 0
    for s in range(0, tau.numel(), chunk):
        part = base[s:s + chunk].float() + tau[s:s + chunk].float()
        bad += int((~torch.isfinite(part)).sum())
    if bad:
        raise NPSError(f"{what}: {bad:,} of {tau.numel():,} prunable entries are NaN or infinite; "
                       "nothing was written")


def run_merge(opts) -> Dict[str, Any]:
    from ..checkpoints import open_checkpoint, save_model_folder, save_tensors
    from ..checkpoints.save import atomic_output_dir
    from ..core.merge import HALF_MERGERS, merge, nps_combine
    if opts.tau_dtype != "float32" and (opts.method not in HALF_MERGERS or getattr(opts, "prune", None)
                                        or opts.collide != "allow" or opts.trim != "global"):
        raise NPSError(f"--tau-dtype {opts.tau_dtype}: merges hold 16-bit task vectors for --method "
                       f"{', '.join(HALF_MERGERS)} (TIES with its global trim, no --collide, no "
                       "--prune); the others use float32 τ")
    t0 = time.perf_counter()
    if len(opts.finetuned) < 2:
        raise NPSError("merge needs at least two fine-tuned models")
    names = task_names(opts.finetuned, opts.names, reserved=MERGE_OUTPUT_FILES)
    if opts.eval and len(opts.eval) != len(opts.finetuned):
        raise NPSError(f"--eval gives {len(opts.eval)} evaluators for {len(opts.finetuned)} models "
                       "(one per task, in the same order)")
    if opts.test and len(opts.test) != len(opts.finetuned):
        raise NPSError(f"--test gives {len(opts.test)} evaluators for {len(opts.finetuned)} models")
    prune_first = getattr(opts, "prune", None)
    if prune_first and opts.method == "nps":
        raise NPSError("--prune: --method nps prunes each task with NPS itself; --prune is for the "
                       "other merge methods")
    if prune_first == "nps" and not opts.eval:
        raise NPSError("--prune nps searches each task on its calibration data: pass one --eval SPEC "
                       "per task")
    searching = opts.lam is None and opts.method != "average"
    if (searching or opts.method == "nps") and not opts.eval:
        raise NPSError(f"--method {opts.method} without --lambda searches on calibration data: "
                       "pass one --eval SPEC per task, or a fixed --lambda"
                       if opts.method != "nps" else "--method nps prunes each task with NPS: pass one "
                       "--eval SPEC per task")
    if opts.lam is None and opts.method != "average" and not opts.lambda_grid:
        raise NPSError("lambda_grid: give at least one λ to try, or a fixed --lambda")
    _check_merge_options(opts)
    inputs = [opts.pretrained, *opts.finetuned]
    wd = prepare_work_dir(opts.output, opts.resume, inputs,
                          searches=opts.method == "nps" or prune_first == "nps")
    need_model = bool(opts.eval or opts.test)
    sessions = []
    for ft, name in zip(opts.finetuned, names):
        sessions.append(Session.load(opts.pretrained, ft, model_factory=opts.model_factory, name=name,
                                     allow_shape_mismatch=opts.allow_shape_mismatch,
                                     running_stats=opts.running_stats, need_model=False,
                                     device=opts.device, tau_dtype=opts.tau_dtype))
        share_base(sessions)          # one θ_pre for all tasks, not one copy per task
    if need_model:
        share_models(sessions)        # one scoring model where the tasks' models differ only in τ
    merge_settings = MergeSettings.from_options(opts)
    ev_kw = {"seed": opts.seed, "batch_size": opts.batch_size, "max_length": opts.max_length}
    evaluators = ([s.evaluator(spec, calib_size=opts.calib_size, **ev_kw)
                   for s, spec in zip(sessions, opts.eval)] if opts.eval else [])
    report: Dict[str, Any] = {"command": "merge", "created": now_iso(), "settings": dataclasses.asdict(opts),
                              "inputs": input_sources(opts),
                              "seed": opts.seed, "versions": versions(), "tasks": names}
    if prune_first:           # each τ_i slimmed first, then merged by --method
        rows, searches = [], {}
        for s, name, spec in zip(sessions, names, opts.eval or [None] * len(sessions)):
            out = prune_task(s, prune_first, opts, eval_spec=spec if prune_first == "nps" else None,
                             log_path=safe_child(wd, f"search-{name}.jsonl") if prune_first == "nps" else None,
                             progress=not opts.quiet)
            rows.append(out.pruned.to(s.task_vector.values.dtype))
            share_base(sessions)
            searches[name] = {"method": prune_first, "keep_ratio": opts.keep,
                              "kept": int(torch.count_nonzero(out.pruned)),
                              **({"calibration": out.calibration, **search_report(out.search)}
                                 if prune_first == "nps" else {})}
        taus = torch.stack(rows)
        report["pruning"] = searches
    else:
        taus = stack_task_vectors(sessions)
    if opts.method == "nps":
        pruned_rows, searches, outcomes = [], {}, []
        for s, spec, name in zip(sessions, opts.eval, names):
            out = prune_task(s, "nps", opts, eval_spec=spec,
                             log_path=safe_child(wd, f"search-{name}.jsonl"), progress=not opts.quiet)
            pruned_rows.append(out.pruned)
            share_base(sessions)      # the search took θ_pre back as a copy of its own: share it again
            outcomes.append(out)
            searches[name] = {"calibration": out.calibration, **search_report(out.search)}
        pruned = torch.stack(pruned_rows)
        report["pruning"] = searches
        if opts.lam is not None:
            lambdas, grid, lam_result = [opts.lam] * len(sessions), [], None
        else:
            lambdas, grid, lam_result = nps_merge_lambdas(sessions, evaluators, pruned,
                                                          settings=merge_settings,
                                                          progress=not opts.quiet)
        report.update(lambda_grid=grid, lambda_search=search_report(lam_result))
        if merge_settings.joint_generations > 0:
            from .settings import PruneSettings
            prune_settings = PruneSettings.from_options(opts)
            points = [task_point(s, o, prune_settings) for s, o in zip(sessions, outcomes)]
            two_stage = float(np.mean(merged_scores(
                sessions, evaluators, nps_combine(pruned, lambdas, opts.normalize, opts.collide))))
            pruned, lambdas, joint = joint_nps_merge(
                sessions, evaluators, points, lambdas, settings=merge_settings,
                log_path=safe_child(wd, "search-joint.jsonl"), progress=not opts.quiet)
            report["joint_search"] = {"two_stage_score": two_stage, **search_report(joint)}
        merged = nps_combine(pruned, lambdas, opts.normalize, opts.collide)
        report["lambdas"] = lambdas
    elif opts.lam is not None or opts.method == "average":
        merged = merge(opts.method, taus, lam=opts.lam if opts.lam is not None else 1.0,
                       keep_ratio=opts.keep, seed=opts.seed,
                       shapes=sessions[0].task_vector.layout.shapes, collide=opts.collide,
                       trim=opts.trim, matrices=opts.svd_matrices)
        # weight averaging has no λ (it ignores --lambda): do not report one as if it were used
        report.update(lambdas=[opts.lam] * len(sessions)
                      if opts.lam is not None and opts.method != "average" else None)
    else:
        merged, lam, grid = merge_with_lambda_grid(opts.method, taus, sessions, evaluators,
                                                   settings=merge_settings)
        report.update(lambdas=[lam] * len(sessions), lambda_grid=grid)
    if evaluators:
        report["calibration"] = dict(zip(names, merged_scores(sessions, evaluators, merged)))
    if opts.test:
        tests = [s.evaluator(spec, **ev_kw) for s, spec in zip(sessions, opts.test)]
        report["test"] = dict(zip(names, merged_scores(sessions, tests, merged)))
        report["test_finetuned"] = {n: s.score(ev, s.task_vector.values)
                                    for n, s, ev in zip(names, sessions, tests)}
    report["timings"] = {"total_s": time.perf_counter() - t0}
    report["memory"] = {"peak_rss_bytes": peak_rss_bytes()}     # the whole merge, before writing
    merged = merged.cpu()
    base_cpu = sessions[0].base_flat.cpu().float()     # the written model is computed in float32
    check_finite_model(base_cpu, merged, f"the merged model (λ = {report.get('lambdas')})")
    first = sessions[0].task_vector.with_values(merged)
    theta = first.apply_to(base_cpu)   # θ of the merged model, once for every task's folder
    with atomic_output_dir(opts.output, inputs=inputs) as tmp:
        save_tensors(tmp / "merged_task_vector.safetensors", {k: v.contiguous() for k, v in first.items()},
                     metadata={"method": opts.method})
        from ..report.model_card import write_model_card
        from .prune import _given
        for s, name in zip(sessions, names):
            tv = s.task_vector.with_values(merged)
            folder = safe_child(tmp, name, what="--names", reserved=MERGE_OUTPUT_FILES)
            save_model_folder(folder, tv.model_state(theta), like=open_checkpoint(s.finetuned),
                              inputs=inputs)
            write_model_card(folder, kind="merged", name=name, pretrained=_given(opts, "pretrained"),
                             method=opts.method, keep=opts.keep if opts.method != "average" else None,
                             settings={"lambdas": report.get("lambdas"), "seed": opts.seed},
                             calibration={k: v for k, v in (report.get("calibration") or {}).items()},
                             test={k: v for k, v in (report.get("test") or {}).items()},
                             extra_tags=["merge"], note=f"Merged tasks: {', '.join(names)}.")
        write_json(tmp / "report.json", report)
    from ..workdirs import release_work_dir
    release_work_dir(wd)
    if not opts.quiet:
        for split in ("calibration", "test"):
            if split in report:
                row = "  ".join(f"{k} {v:.4f}" for k, v in report[split].items())
                print(f"{split:12s} {row}  mean {np.mean(list(report[split].values())):.4f}")
        print(f"wrote {opts.output} (one model folder per task)")
    return report
