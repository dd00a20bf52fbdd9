"""``nps transfer``: the options mapped to settings, :func:`~nps_pruning.apps.transfer.transfer`
run (λ chosen on both abilities' calibration data), the transferred model and report written."""
from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any, Dict

import torch

from ..apps.merge import check_finite_model
from ..apps.prune import search_report
from ..apps.session import Session
from ..apps.transfer import transfer
from ..checkpoints import open_checkpoint, save_model_folder
from ..checkpoints.save import atomic_output_dir
from ..errors import NPSError
from ..report.model_card import write_model_card
from ..report.plots import plot_search
from ..report.report import now_iso, versions, write_json
from ..workdirs import release_work_dir
from .common import given_input, input_sources, prepare_work_dir
from .settings import check_prune_options, prune_settings


def run_transfer(opts) -> Dict[str, Any]:
    if opts.tau_dtype != "float32":
        raise NPSError("--tau-dtype is supported by nps prune only (merges and stores use float32 τ)")
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
                   settings=prune_settings(opts), eval_target_spec=opts.eval_target,
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
    final_values = (res["lambda"] * res["tau_hat"]).cpu()
    check_finite_model(session.base_flat.cpu(), final_values,
                       f"the transferred model (λ = {res['lambda']})")
    final = tv.with_values(final_values)
    with atomic_output_dir(opts.output, inputs=inputs) as tmp:
        save_model_folder(tmp, final.state_dict(session.base_flat.cpu()),
                          like=open_checkpoint(opts.finetuned), inputs=inputs)
        write_json(tmp / "report.json", report)
        write_model_card(tmp, kind="transferred", name=Path(opts.output).name,
                         pretrained=given_input(opts, "pretrained"), method=opts.method,
                         keep=opts.keep if opts.method != "none" else None,
                         settings={"lam": res["lambda"], "seed": opts.seed},
                         calibration={f"{k}": v for k, v in (res.get("calibration") or {}).items()
                                      if isinstance(v, (int, float))})
        if outcome is not None and outcome.search is not None:
            plot_search(outcome.search, tmp / "search.png", title=f"NPS search for transfer: {tv.name}")
            shutil.copy2(wd / "search.jsonl", tmp / "search.jsonl")
    release_work_dir(wd)
    if not opts.quiet:
        print(f"λ = {res['lambda']:g}")
        for who, s in res["calibration"].items():
            print(f"{who:10s} source {s['source']:.4f}  target {s['target']:.4f}  H {s['h_score']:.4f}")
        print(f"wrote {opts.output}")
    return report
