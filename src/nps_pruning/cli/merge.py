"""``nps merge``: the options checked and mapped to settings, each task loaded (θ_pre and the
scoring model shared where they are the same), the merge run (NPS-merge, or a baseline with λ
chosen on calibration data), one model folder per task and the report written."""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Dict

import numpy as np
import torch

from ..apps.merge import (MERGE_OUTPUT_FILES, check_finite_model, joint_nps_merge, merge_with_lambda_grid,
                          merged_scores, nps_merge_lambdas, pick_merge, share_base, share_models,
                          stack_task_vectors, task_names, task_point)
from ..apps.prune import prune, search_report
from ..apps.session import Session
from ..checkpoints import open_checkpoint, save_model_folder, save_tensors
from ..checkpoints.save import atomic_output_dir, same_weight_files
from ..core.merge import HALF_MERGERS, MERGE_OPTIONS, merge, nps_combine, option_problem
from ..errors import NPSError
from ..paths import safe_child
from ..report.model_card import write_model_card
from ..report.report import now_iso, peak_rss_bytes, versions, write_json
from ..task_vector import same_extras
from ..workdirs import release_work_dir
from .common import given_input, input_sources, prepare_work_dir
from .settings import check_prune_options, merge_settings, prune_settings


def check_merge_options(opts) -> None:
    """The options that only some methods take, refused clearly for the others."""
    problem = option_problem(opts.method, opts.collide, opts.trim, matrices=opts.svd_matrices,
                             flag=lambda name: "--svd-matrices" if name == "matrices" else f"--{name}")
    if problem:
        raise NPSError(problem)
    if opts.joint_generations and opts.method != "nps":
        raise NPSError("--joint-generations is the merge-aware search of --method nps")
    if opts.joint_generations and opts.lam is not None:
        raise NPSError("--joint-generations searches the λ_i: do not fix --lambda")
    if opts.combine != "best" and opts.method != "nps":
        raise NPSError("--combine is how --method nps combines its slim vectors")


def run_merge(opts) -> Dict[str, Any]:
    if opts.tau_dtype != "float32" and (opts.method not in HALF_MERGERS or getattr(opts, "prune", None)
                                        or opts.collide != MERGE_OPTIONS["collide"][0]
                                        or opts.trim != MERGE_OPTIONS["trim"][0]):
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
    check_merge_options(opts)
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
    msettings = merge_settings(opts)
    ev_kw = {"seed": opts.seed, "batch_size": opts.batch_size, "max_length": opts.max_length}
    evaluators = ([s.evaluator(spec, calib_size=opts.calib_size, **ev_kw)
                   for s, spec in zip(sessions, opts.eval)] if opts.eval else [])
    report: Dict[str, Any] = {"command": "merge", "created": now_iso(), "settings": dataclasses.asdict(opts),
                              "inputs": input_sources(opts),
                              "seed": opts.seed, "versions": versions(), "tasks": names}
    if prune_first or opts.method == "nps":      # the per-task pruning's settings (its own search's)
        slim = prune_settings(opts, method=prune_first or "nps")
        for spec in opts.eval or [None]:
            check_prune_options(prune_first or "nps", opts, spec if (prune_first or "nps") == "nps" else None)
    if prune_first:           # each τ_i slimmed first, then merged by --method
        rows, searches = [], {}
        for s, name, spec in zip(sessions, names, opts.eval or [None] * len(sessions)):
            out = prune(s, prune_first, settings=slim, eval_spec=spec if prune_first == "nps" else None,
                        log_path=safe_child(wd, f"search-{name}.jsonl") if prune_first == "nps" else None,
                        resume=opts.resume, progress=not opts.quiet)
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
            out = prune(s, "nps", settings=slim, eval_spec=spec, log_path=safe_child(wd, f"search-{name}.jsonl"),
                        resume=opts.resume, progress=not opts.quiet)
            pruned_rows.append(out.pruned)
            share_base(sessions)      # the search took θ_pre back as a copy of its own: share it again
            outcomes.append(out)
            searches[name] = {"calibration": out.calibration, **search_report(out.search)}
        pruned = torch.stack(pruned_rows)
        report["pruning"] = searches
        if msettings.combine == "best":    # (merge_settings: never with a fixed λ or a joint search)
            merged, lambdas, tried, i = pick_merge(sessions, evaluators, pruned, taus, settings=msettings,
                                                   progress=not opts.quiet)
            report["combine"] = {"rule": "best", "tried": tried, "picked": tried[i]}
        else:
            if opts.lam is not None:
                lambdas, grid, lam_result = [opts.lam] * len(sessions), [], None
            else:
                lambdas, grid, lam_result = nps_merge_lambdas(sessions, evaluators, pruned,
                                                              settings=msettings,
                                                              progress=not opts.quiet)
            report.update(combine={"rule": "nps"}, lambda_grid=grid, lambda_search=search_report(lam_result))
            if msettings.joint_generations > 0:
                points = [task_point(s, o, slim) for s, o in zip(sessions, outcomes)]
                two_stage = float(np.mean(merged_scores(
                    sessions, evaluators, nps_combine(pruned, lambdas, opts.normalize, opts.collide),
                    msettings.cpu_linear)))
                pruned, lambdas, joint = joint_nps_merge(
                    sessions, evaluators, points, lambdas, settings=msettings,
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
                                                   settings=msettings)
        report.update(lambdas=[lam] * len(sessions), lambda_grid=grid)
    if evaluators:
        report["calibration"] = dict(zip(names, merged_scores(sessions, evaluators, merged,
                                                               msettings.cpu_linear)))
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
        shared = []     # tasks whose folder hard-links the first folder's weights (equal models)
        for s, name in zip(sessions, names):
            tv = s.task_vector.with_values(merged)
            folder = safe_child(tmp, name, what="--names", reserved=MERGE_OUTPUT_FILES)
            same = s is not sessions[0] and same_extras(s.task_vector, sessions[0].task_vector)
            save_model_folder(folder, tv.model_state(theta), like=open_checkpoint(s.finetuned),
                              inputs=inputs, weights_of=tmp / names[0] if same else None)
            if same and same_weight_files(tmp / names[0], folder):
                shared.append(name)
            write_model_card(folder, kind="merged", name=name, pretrained=given_input(opts, "pretrained"),
                             method=opts.method, keep=opts.keep if opts.method != "average" else None,
                             settings={"lambdas": report.get("lambdas"), "seed": opts.seed},
                             calibration={k: v for k, v in (report.get("calibration") or {}).items()},
                             test={k: v for k, v in (report.get("test") or {}).items()},
                             extra_tags=["merge"], note=f"Merged tasks: {', '.join(names)}.")
        report["weights_shared_with_first"] = shared
        write_json(tmp / "report.json", report)
    release_work_dir(wd)
    if not opts.quiet:
        for split in ("calibration", "test"):
            if split in report:
                row = "  ".join(f"{k} {v:.4f}" for k, v in report[split].items())
                print(f"{split:12s} {row}  mean {np.mean(list(report[split].values())):.4f}")
        print(f"wrote {opts.output} (one model folder per task"
              + (f"; {', '.join(shared)}: the same model as {names[0]}, its weight files hard-linked)"
                 if shared else ")"))
    return report
