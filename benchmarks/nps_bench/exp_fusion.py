"""Experiment: fusion of all a suite's tasks (Table 2), then their compression (one job per suite,
after its pruning jobs)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from nps_pruning.apps.settings import MergeSettings
from .cache import ResultCache, _logger, _set_threads
from .config import BenchConfig
from .context import TaskContext, _find_nps, _strip, _task_params, nps_step_params
from .exp_compression import run_compression
from .labels import FOCUSED, merge_single_label


def run_fusion_job(suite: str, tasks: List[dict], cfg_dict: dict, cache_root: str,
                   pruning: Dict[str, dict], wins_rows: Optional[Dict[str, list]] = None) -> dict:
    """Fusion (Table 2) and compression (Table 3, Fig. 5) of all the suite's tasks."""
    import torch
    from nps_pruning.apps.merge import merge_with_lambda_grid, merged_scores, nps_merge_lambdas
    from nps_pruning.core.merge import MERGERS, nps_combine
    from nps_pruning.task_vector import stack_values

    cfg = BenchConfig.from_dict(cfg_dict).for_suite(suite)
    _set_threads(cfg.threads)
    cache = ResultCache(Path(cache_root))
    log = _logger(f"{suite}/fusion")
    t_job = time.perf_counter()
    ctxs = [TaskContext(suite, t, cfg) for t in tasks]
    names = [t["name"] for t in tasks]
    base_params = {"tasks": [_task_params(t) for t in tasks], **cfg.eval_params(suite)}
    state: Dict[str, Any] = {}

    def sessions():
        return [c.session for c in ctxs]

    def calibs():
        return [c.calib for c in ctxs]

    def tests():
        return [c.test for c in ctxs]

    def taus():
        if "taus" not in state:
            state["taus"] = stack_values([c.session.task_vector for c in ctxs])
        return state["taus"]

    def nps_pruned():
        if "pruned" not in state:
            rows = []
            for c in ctxs:
                row = _find_nps(pruning[c.task["name"]], FOCUSED, cfg.fusion_keep)
                rows.append(c.nps_pruned(cfg.fusion_keep, cfg.scheme, cfg.upper, row["weights"]))
            state["pruned"] = torch.stack(rows)
        return state["pruned"]

    def msettings(**over) -> MergeSettings:
        return MergeSettings(seed=cfg.seed, **over)

    def scored(merged, extra=None) -> dict:
        calib = merged_scores(sessions(), calibs(), merged)
        test = merged_scores(sessions(), tests(), merged)
        return {"calib": calib, "test": test, "calib_mean": float(np.mean(calib)),
                "test_mean": float(np.mean(test)), **(extra or {})}

    fusion: Dict[str, dict] = {}
    fusion["pre-trained"] = cache.step(suite, "_fusion", "pretrained", base_params,
                                       lambda: scored(torch.zeros_like(ctxs[0].session.task_vector.values)),
                                       log)
    ft_test = [pruning[n]["finetuned"]["test"] for n in names]
    ft_calib = [pruning[n]["finetuned"]["calib"] for n in names]
    fusion["fine-tuned"] = {"test": ft_test, "calib": ft_calib, "test_mean": float(np.mean(ft_test)),
                            "calib_mean": float(np.mean(ft_calib)), "note": "each task's own fine-tuned model"}
    fusion["average"] = cache.step(suite, "_fusion", "average", base_params,
                                   lambda: scored(MERGERS["average"](taus())), log)
    for method, keep, grid in (("task-arithmetic", 1.0, cfg.ta_grid), ("ties", cfg.ties_keep, cfg.ties_grid),
                               ("dare-ties", cfg.ties_keep, cfg.ties_grid),
                               ("della", cfg.ties_keep, cfg.ties_grid),
                               ("tsv-m", 1.0, cfg.svd_grid), ("iso-c", 1.0, cfg.svd_grid)):
        if method not in cfg.fusion_methods:
            continue
        # the SVD merges under both tensor rules (merge_svd.MATRIX_RULES): the published "2d" (the
        # shipped default, its rule in the key) and "flatten" (the rule before it; keyed as then)
        rules = ("2d", "flatten") if method in ("tsv-m", "iso-c") else (None,)
        for rule in rules:
            def grid_merge(method=method, keep=keep, grid=grid, rule=rule):
                over = {"matrices": rule} if rule else {}
                merged, lam, g = merge_with_lambda_grid(method, taus(), sessions(), calibs(),
                                                        settings=msettings(keep_ratio=keep, lambda_grid=grid,
                                                                           **over))
                return scored(merged, {"lambda": lam, "grid": g, "keep": keep})
            key = {**base_params, "grid": list(grid), "keep": keep, "seed": cfg.seed,
                   **({"matrices": rule} if rule not in (None, "flatten") else {})}
            fusion[method if rule in (None, "2d") else f"{method}-{rule}"] = cache.step(
                suite, "_fusion", method, key, grid_merge, log)

    nps_params = {**base_params, "pruned": [nps_step_params(suite, t, cfg, cfg.scheme, cfg.upper, cfg.fusion_keep)
                                            for t in tasks]}
    norm_results = {}
    for norm in cfg.normalizations:
        def nps_grid(norm=norm):
            n = len(tasks)
            grid = []
            best = None
            lams = list(cfg.nps_merge_grid)
            if norm == "lambda-sum":
                # Σ λ·τ̂_i / Σ λ = mean τ̂_i for every common λ: one point of the grid says it all
                lams = lams[:1]
            for lam in lams:
                merged = nps_combine(nps_pruned(), [lam] * n, norm)
                score = float(np.mean(merged_scores(sessions(), calibs(), merged)))
                grid.append({"lambda": lam, "score": score})
                if best is None or score > best[1]:
                    best = (lam, score)
            merged = nps_combine(nps_pruned(), [best[0]] * n, norm)
            return scored(merged, {"lambda": best[0], "grid": grid, "normalize": norm})
        norm_results[norm] = cache.step(suite, "_fusion", f"nps-merge-grid-{norm}",
                                        {**nps_params, "grid": list(cfg.nps_merge_grid), "norm": norm}, nps_grid, log)
        fusion[merge_single_label(norm)] = norm_results[norm]
    best_norm = max(cfg.normalizations, key=lambda n: (norm_results[n]["calib_mean"],
                                                      -cfg.normalizations.index(n)))

    def nps_search():
        settings = msettings(normalize=best_norm, lambda_grid=cfg.nps_merge_grid,
                             lambda_generations=cfg.lambda_generations)
        lambdas, grid, result = nps_merge_lambdas(sessions(), calibs(), nps_pruned(), settings=settings,
                                                  progress=False)
        merged = nps_combine(nps_pruned(), lambdas, best_norm)
        return scored(merged, {"lambda": [float(x) for x in lambdas], "normalize": best_norm,
                               "search_candidates": 0 if result is None else len(result.candidates)})
    if cfg.lambda_generations > 0:        # 0: no per-task λ search (the LLM suites' cut grid)
        fusion["NPS-merge"] = cache.step(suite, "_fusion", f"nps-merge-search-{best_norm}",
                                         {**nps_params, "grid": list(cfg.nps_merge_grid), "norm": best_norm,
                                          "gens": cfg.lambda_generations}, nps_search, log)

    # ---------------- compression
    comp = run_compression(suite, tasks, cfg, cache, ctxs, pruning, fusion, taus, nps_pruned, nps_params, log,
                           base_params=base_params, wins_rows=wins_rows)

    def tau_norm(c):            # the relative size of τ over the prunable entries
        s = c.session
        tau, base = float(s.task_vector.values.double().norm()), float(s.base_flat.double().norm())
        return {"tau_norm": tau, "base_norm": base, "ratio": tau / base if base > 0 else float("inf")}
    tau = {c.task["name"]: _strip(cache.step(suite, c.task["name"], "tau-norm", {**_task_params(c.task), "v": 1},
                                             lambda c=c: tau_norm(c), log)) for c in ctxs}
    return {"suite": suite, "tasks": names, "tau": tau, "fusion": {k: _strip(v) for k, v in fusion.items()},
            "best_normalization": best_norm, "compression": comp, "job_s": time.perf_counter() - t_job}
