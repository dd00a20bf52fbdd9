"""Experiment: the pruning grid of one task (the paper's Fig. 4; one job per task).

Baselines (magnitude, DARE, random) at every keep ratio, and NPS searches of every variant of
:func:`nps_variants` (both band schemes, the upper-bound, log-scale, σ0 and generations studies).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import List, Sequence, Tuple

from .cache import ResultCache, _logger, _set_threads
from .config import BenchConfig
from .context import TaskContext, _strip, _task_params, nps_step_params
from .labels import FOCUSED, FOCUSED_LOG, FOCUSED_LONG, UNIFORM, sigma_variant, upper_variant


def nps_variants(cfg: BenchConfig) -> List[Tuple[str, str, float, float, dict]]:
    """(variant label, scheme, upper, keep, search settings it changes beyond scheme/upper) of every
    NPS search in the grid, in run order."""
    out = []
    keeps = list(cfg.nps_keep_ratios)
    first = [r for r in (0.05, 0.1) if r in keeps]            # the ones other steps reuse, first
    for r in first + [r for r in keeps if r not in first]:
        out.append((FOCUSED, "focused", cfg.upper, r, {}))
    for r in cfg.uniform_keep_ratios:
        out.append((UNIFORM, "uniform", cfg.upper, r, {}))
    for r in cfg.ablation_keep_ratios:
        out.append((upper_variant(cfg.ablation_upper), "focused", cfg.ablation_upper, r, {}))
    for r in cfg.ablation_keep_ratios:      # the log-scale parametrisation
        out.append((FOCUSED_LOG, "focused", cfg.log_upper, r,
                    {"param": "log", "lower": cfg.log_lower, "sigma0": cfg.log_sigma0}))
    for sigma in cfg.sigma0_ablation:
        for r in cfg.sigma0_keep_ratios:
            out.append((sigma_variant(sigma), "focused", cfg.upper, r, {"sigma0": float(sigma)}))
    if cfg.long_keep is not None and cfg.long_generations > cfg.generations:
        out.append((FOCUSED_LONG, "focused", cfg.upper, cfg.long_keep, {"generations": cfg.long_generations}))
    return out


def run_pruning_job(suite: str, task: dict, cfg_dict: dict, cache_root: str) -> dict:
    cfg = BenchConfig.from_dict(cfg_dict).for_suite(suite)
    _set_threads(cfg.threads)
    cache = ResultCache(Path(cache_root))
    log = _logger(f"{suite}/{task['name']}")
    ctx = TaskContext(suite, task, cfg)
    ep = {**_task_params(task), **cfg.eval_params(suite)}
    t_job = time.perf_counter()
    rows: List[dict] = []

    def finetuned():
        s = ctx.session
        return {"test": s.score(ctx.test, s.task_vector.values), "calib": s.score(ctx.calib, s.task_vector.values),
                "test_rows": ctx.test.num_rows, "calib_rows": ctx.calib.num_rows,
                "num_entries": s.task_vector.num_entries,
                "task_specific_entries": int(sum(v.numel() for v in s.task_vector.task_specific.values())),
                "load_s": s.load_s}
    ft = cache.step(suite, task["name"], "finetuned", ep, finetuned, log)
    if task["name"] in cfg.memory_tasks:     # the LLM suites: peak memory of a search in its own process
        mem = cache.step(suite, task["name"], "memory", {**ep, "cmd": MEMORY_ARGS, "keep": 0.05,
                                                          "v": MEMORY_VERSION},
                         lambda: search_memory(task, cfg.calib_size(suite), cfg.batch_size), log)
        ft = {**ft, "memory": _strip(mem)}

    for method in cfg.baselines:
        for r in cfg.keep_ratios:
            def baseline(method=method, r=r):
                from nps_pruning.core import PRUNERS
                from nps_pruning.core.prepared import prune_in_domain
                s = ctx.session
                pruned = prune_in_domain(PRUNERS[method], s.task_vector.values, r, s.domain, seed=cfg.seed)
                out = {"test": s.score(ctx.test, pruned)}
                if method == "magnitude":
                    tt = prune_in_domain(PRUNERS["ties-trim"], s.task_vector.values, r, s.domain, seed=cfg.seed)
                    out["ties_trim_identical"] = bool(torch_equal(tt, pruned))
                return out
            res = cache.step(suite, task["name"], f"prune-{method}-r{r:g}", {**ep, "method": method, "keep": r},
                             baseline, log)
            rows.append({"method": method, "variant": None, "keep": r, **_strip(res)})

    for label, scheme, upper, r, extra in nps_variants(cfg):
        params = {**nps_step_params(suite, task, cfg, scheme, upper, r), **extra}

        def search(scheme=scheme, upper=upper, r=r, extra=extra, label=label):
            from nps_pruning.apps.prune import prune
            from nps_pruning.report.plots import search_curves
            s = ctx.session
            settings = ctx.settings.replace(keep_ratio=r, scheme=scheme, upper=upper, **extra)
            out = prune(s, "nps", settings=settings, eval_spec=task["eval_calib"], progress=False)
            res = out.search
            curves = search_curves(res)
            more = {}
            if label == FOCUSED_LONG:
                more["checkpoints"] = _checkpoints(ctx, res, r, scheme, upper, cfg.long_checkpoints)
            return {**more, "test": s.score(ctx.test, out.pruned), "calib": float(res.best_score),
                    "calib_magnitude": res.baseline_score, "weights": [float(w) for w in res.best_weights],
                    "best_so_far": [float(x) for x in curves["best_so_far"]],
                    "gen_best": [float(x) for x in curves["best"]],
                    "num_candidates": len(res.candidates), "search_s": float(res.seconds),
                    "eval_s_total": float(sum(c.get("eval_s") or 0.0 for c in res.candidates)),
                    "build_s_total": float(sum(c.get("build_s") or 0.0 for c in res.candidates)),
                    "bands_sizes": [out.bands.starts[i + 1] - out.bands.starts[i]
                                    for i in range(out.bands.num_bands)],
                    "stopped_early": res.stopped_early}
        res = cache.step(suite, task["name"], f"prune-nps-{label}-r{r:g}", params, search, log)
        rows.append({"method": "nps", "variant": label, "keep": r, **_strip(res)})
    return {"suite": suite, "task": task["name"], "finetuned": _strip(ft), "pruning": rows,
            "job_s": time.perf_counter() - t_job}


def _checkpoints(ctx: "TaskContext", res, keep: float, scheme: str, upper: float,
                 gens: Sequence[int]) -> List[dict]:
    """Test accuracy of the best-so-far candidate after each generation in ``gens`` of one search
    (exactly what a search stopped there returns; see ``best_up_to``)."""
    from nps_pruning.search import best_up_to
    out, seen = [], {}
    for g in sorted(set(int(x) for x in gens)):
        best = best_up_to(res.candidates, g)
        if best is None:
            continue
        key = tuple(best["weights"])
        if key not in seen:
            pruned = ctx.nps_pruned(keep, scheme, upper, best["weights"])
            seen[key] = ctx.session.score(ctx.test, pruned)
        out.append({"generation": g, "calib": float(best["score"]), "test": float(seen[key]),
                    "weights": [float(w) for w in best["weights"]], "found_at": [int(best["gen"]), int(best["idx"])],
                    "candidates": sum(1 for c in res.candidates if int(c["gen"]) <= g)})
    return out


MEMORY_ARGS = ["--generations", "2", "--popsize", "4", "--keep", "0.05", "--quiet"]
MEMORY_VERSION = 2   # 2: the hybrid space's index is one int32 permutation; the search's own peak


def search_memory(task: dict, calib_size: int, batch_size: int) -> dict:
    """Peak resident memory of ``nps prune`` (the shipped default search, 2 generations of 4) on
    this task, run as its own process (``os.wait4``'s ru_maxrss of that child alone; and the
    search's own peak, before the pruned τ̂ is built, from its report.json), next to the bytes of
    the model's float32 weights and of τ: what the search holds beyond them is measured, not
    assumed."""
    import json
    import os
    import subprocess
    import sys
    import tempfile
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "nps_pruning.cli", "prune", task["base"], task["finetuned"],
               "--eval", task["eval_calib"], "--calib-size", str(calib_size), "--batch-size", str(batch_size),
               "--max-length", str(task.get("max_length") or 128), "--output", out, *MEMORY_ARGS]
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        err = p.stderr.read()
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode != 0:
            raise RuntimeError(f"nps prune failed ({p.returncode}): {err.decode(errors='replace')[-2000:]}")
        report = json.loads((Path(out) / "report.json").read_text())
    search_peak = (report.get("memory") or {}).get("search_peak_rss_bytes")
    D = int(report["model"]["num_entries"])         # the prunable entries: τ is D float32 values
    model_bytes = tau_bytes = 4 * D                 # ... and so are the model's prunable weights
    return {"peak_rss_bytes": int(ru.ru_maxrss) * 1024, "search_peak_rss_bytes": search_peak,
            "tau_bytes": tau_bytes,
            "model_bytes": model_bytes, "wall_s": time.perf_counter() - t0,
            "command": "nps prune PRE FT --eval CALIB " + " ".join(MEMORY_ARGS)}


def torch_equal(a, b) -> bool:
    import torch
    return torch.equal(a, b)
