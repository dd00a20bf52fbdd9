"""``nps prune``: the options mapped to :class:`~nps_pruning.apps.settings.PruneSettings`,
:func:`~nps_pruning.apps.prune.prune` run on the loaded pair, the slim model, its sparse τ̂ and
report written."""
from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any, Dict

import torch

from ..apps.prune import band_summary, prune, search_report
from ..apps.session import Session
from ..checkpoints import open_checkpoint, save_model_folder, save_sparse_tensors
from ..checkpoints.save import atomic_output_dir
from ..core import PRUNERS
from ..core.prepared import prune_in_domain
from ..errors import NPSError
from ..report.model_card import write_model_card
from ..report.plots import plot_search
from ..report.report import now_iso, peak_rss_bytes, versions, write_json
from ..workdirs import release_work_dir
from .common import given_input, input_sources, prepare_work_dir
from .settings import check_prune_options, prune_settings


def run_prune(opts) -> Dict[str, Any]:
    t_start = time.perf_counter()
    inputs = [opts.pretrained, opts.finetuned]
    wd = prepare_work_dir(opts.output, opts.resume, inputs, searches=opts.method == "nps")
    session = Session.load(opts.pretrained, opts.finetuned, model_factory=opts.model_factory,
                           allow_shape_mismatch=opts.allow_shape_mismatch,
                           running_stats=opts.running_stats,
                           need_model=bool(opts.eval or opts.test or opts.method == "nps"),
                           device=opts.device, tau_dtype=opts.tau_dtype)
    tv = session.task_vector
    settings = prune_settings(opts)
    check_prune_options(opts.method, opts, opts.eval)
    outcome = prune(session, opts.method, settings=settings, eval_spec=opts.eval,
                    log_path=wd / "search.jsonl", resume=opts.resume, progress=not opts.quiet)
    test_scores: Dict[str, float] = {}
    if opts.test:
        test_eval = session.evaluator(opts.test, seed=opts.seed, batch_size=opts.batch_size,
                                      max_length=opts.max_length)
        test_scores["finetuned"] = session.score(test_eval, tv.values)
        if opts.method == "nps":
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
        write_model_card(tmp, kind="pruned", name=Path(opts.output).name, pretrained=given_input(opts, "pretrained"),
                         method=opts.method, keep=opts.keep,
                         settings={"bands": opts.bands, "space": opts.space, "fitness": opts.fitness,
                                   "seed": opts.seed} if opts.method == "nps" else {"seed": opts.seed},
                         calibration=report["calibration"], test=report["test"])
        if outcome.search is not None:
            plot_search(outcome.search, tmp / "search.png",
                        title=f"NPS search: {tv.name}, keep {opts.keep:g}, {opts.bands} bands")
            shutil.copy2(wd / "search.jsonl", tmp / "search.jsonl")
    if outcome.aborted:
        # the log stays next to the output so that --resume can go on from it
        raise NPSError(f"{outcome.aborted}; the best candidate so far was written to {opts.output} "
                       "(report.json: search.stopped_early); fix the cause and rerun with --resume")
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
