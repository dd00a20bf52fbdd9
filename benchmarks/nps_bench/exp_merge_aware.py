"""Experiment: fusion that beats TIES (issue 14) — the shipped NPS-merge, merge-aware NPS and masks
that do not collide (one job per suite, after its pruning; every step cached).

Rows (each: λ chosen on the calibration rows, mean over tasks; reported on test):

* ``nps-default``: Eq. 7 (``nps merge --method nps --combine nps``, the shipped merge until
  2026-12-06; the step keeps its name so its results stay keyed) — each task's τ̂ of the shipped
  default NPS (hybrid space, loglik, held-out re-scoring; the "NPS that wins" search at r = 0.05,
  rebuilt exactly from its space point), the default λ grid, then the per-task λ search, mask-count
  normalization (``MergeSettings()``'s);
* ``nps-default-collide``: its τ̂ and λ_i with ``--collide magnitude`` (each entry left to one
  task; an ablation at the default's λ_i, not searched again);
* ``nps-joint``: ``--joint-generations`` G: every task's space point and λ_i searched together on
  the merged model's mean calibration score, started from ``nps-default``;
* ``nps-default-r<k>`` for k in :data:`STUDY_KEEPS` (0.1 and TIES' kept share 0.2): the same
  two-stage merge of the shipped default's τ̂ found by the "NPS that wins" search at that r (a
  fairer match for TIES, which keeps 20% of each task vector; skipped where bench-wins has no
  such rows);
* ``ties-sequential`` / ``ties-layer`` / ``ties-collide``: TIES with CABS' conflict-free
  sequential trim, the layer-balanced trim, and allotment by magnitude (on the fusion grid);
* ``nps-into-<m>`` for m in :data:`INTO`: the shipped default's τ̂ (r = 0.05, as ``nps-default``)
  merged by m instead of Eq. 7 (``nps merge --method m --prune nps``), λ on m's fusion grid and
  below it (a rescaled τ̂ wants a smaller λ); ``dare-into-<m>``: DARE's τ̂ at r = 0.05 the same way.
* ``nps-best``: ``nps merge --method nps`` as shipped (``--combine best``) on the default's τ̂ —
  the best on the calibration rows of Eq. 7 on the slim τ̂ (``nps-default``'s merge, computed
  again), and TSV-M and Iso-C on the slim τ̂ and on the dense τ. Which row the report marks as
  the default follows ``MergeSettings().combine`` (``report_tables.default_merge_row``).

``NPS_BENCH_MERGE_AWARE_NPS=0`` runs the TIES rows only (a partial pass when CPU time is short).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from .cache import ResultCache, _logger, _set_threads
from .config import BenchConfig
from .context import TaskContext, _strip, _task_params

MERGE_KEEP = 0.05        # the shipped default's --keep
INTO = ("task-arithmetic", "ties", "tsv-m", "iso-c")   # merges fed the default's slim τ̂ (nps merge --prune)
INTO_LOW = (0.1, 0.2, 0.3)                            # λ below the fusion grids, for the rescaled τ̂
STUDY_KEEPS = (0.1, 0.2)  # the default's τ̂ at these r, merged the same way (rows nps-default-r<k>)
JOINT_GENERATIONS = 3


def _default_points(ctxs, wins_rows: Optional[Dict[str, list]], keep: float):
    rows = []
    for c in ctxs:
        row = next((r for r in (wins_rows or {}).get(c.task["name"], []) if r.get("method") == "nps-default"
                    and abs(r["keep"] - keep) < 1e-12 and r.get("params")), None)
        if row is None:
            return None
        rows.append(row)
    return rows


def run_merge_aware_job(suite: str, tasks: List[dict], cfg_dict: dict, cache_root: str,
                        pruning: Dict[str, dict], wins_rows: Optional[Dict[str, list]] = None) -> dict:
    import torch
    from nps_pruning.apps.merge import (PICK_SVD_GRID, PICKS, joint_nps_merge,
                                        merge_with_lambda_grid, merged_scores, nps_merge_lambdas, pick_merge)
    from nps_pruning.apps.settings import MergeSettings
    from nps_pruning.core.merge import nps_combine
    from nps_pruning.task_vector import stack_values
    from .exp_codings import default_point, default_pruned, point_pruned

    cfg = BenchConfig.from_dict(cfg_dict).for_suite(suite)
    _set_threads(cfg.threads)
    cache = ResultCache(Path(cache_root))
    log = _logger(f"{suite}/merge-aware")
    t_job = time.perf_counter()
    ctxs = [TaskContext(suite, t, cfg) for t in tasks]
    sessions = [c.session for c in ctxs]
    calibs = [c.calib for c in ctxs]
    base_params = {"tasks": [_task_params(t) for t in tasks], **cfg.eval_params(suite)}
    out: Dict[str, dict] = {}

    def scored(merged, extra=None) -> dict:
        calib = merged_scores(sessions, calibs, merged)
        test = merged_scores(sessions, [c.test for c in ctxs], merged)
        return {"calib": calib, "test": test, "calib_mean": float(np.mean(calib)),
                "test_mean": float(np.mean(test)), **(extra or {})}

    taus = stack_values([s.task_vector for s in sessions])
    for key, over in (("ties-sequential", {"trim": "sequential"}), ("ties-layer", {"trim": "layer"}),
                      ("ties-collide", {"collide": "magnitude"})):
        def ties_row(over=over):
            settings = MergeSettings(seed=cfg.seed, keep_ratio=cfg.ties_keep, lambda_grid=cfg.ties_grid, **over)
            merged, lam, grid = merge_with_lambda_grid("ties", taus, sessions, calibs, settings=settings)
            return scored(merged, {"lambda": lam, "grid": grid, "keep": cfg.ties_keep, **over})
        out[key] = _strip(cache.step(suite, "_merge_aware", key,
                                     {**base_params, "grid": list(cfg.ties_grid), "keep": cfg.ties_keep,
                                      "seed": cfg.seed, **over}, ties_row, log))

    if os.environ.get("NPS_BENCH_MERGE_AWARE_NPS", "1") == "0":     # a partial pass: TIES rows only
        log("NPS_BENCH_MERGE_AWARE_NPS=0: the NPS-merge rows are not run in this pass")
        return {"suite": suite, "rows": out, "job_s": time.perf_counter() - t_job, "partial": True}
    wr = _default_points(ctxs, wins_rows, MERGE_KEEP)
    if wr is None:
        log("no 'NPS that wins' default rows at r = 0.05 (run make bench-wins first): NPS rows skipped")
        return {"suite": suite, "rows": out, "job_s": time.perf_counter() - t_job}
    points_src = {"keep": MERGE_KEEP, "points": [r["params"] for r in wr]}
    state: Dict[str, object] = {}

    def points():              # bands and hybrid index built once, for the τ̂ and the joint search
        if "points" not in state:
            state["points"] = [default_point(c, r, MERGE_KEEP) for c, r in zip(ctxs, wr)]
        return state["points"]

    def pruned():
        if "pruned" not in state:
            state["pruned"] = torch.stack([point_pruned(c, p) for c, p in zip(ctxs, points())])
        return state["pruned"]

    shipped = MergeSettings(seed=cfg.seed)
    shipped_params = {"grid": list(shipped.lambda_grid), "gens": shipped.lambda_generations,
                      "normalize": shipped.normalize}

    def two_stage(pruned_fn):
        pr = pruned_fn()
        lambdas, grid, result = nps_merge_lambdas(sessions, calibs, pr, settings=shipped, progress=False)
        merged = nps_combine(pr, lambdas, shipped.normalize)
        return scored(merged, {"lambda": [float(x) for x in lambdas], "grid": grid,
                               "normalize": shipped.normalize,
                               "search_candidates": 0 if result is None else len(result.candidates)})
    out["nps-default"] = _strip(cache.step(suite, "_merge_aware", "nps-default",
                                           {**base_params, **points_src, "settings": shipped_params},
                                           lambda: two_stage(pruned), log))

    def best():                # `nps merge --method nps --combine best` on the default's τ̂ (the
        # shipped merge: measured right after Eq. 7, so a run cut by its budget has it)
        settings = shipped.replace(combine="best")
        merged, lambdas, tried, i = pick_merge(sessions, calibs, pruned(), taus, settings=settings,
                                               progress=False)
        return scored(merged, {"lambda": [float(x) for x in lambdas], "picked": tried[i], "tried": tried})
    out["nps-best"] = _strip(cache.step(suite, "_merge_aware", "nps-best",
                                        {**base_params, **points_src, "settings": shipped_params,
                                         "combine": {"picks": [list(p) for p in PICKS],
                                                     "svd_grid": list(PICK_SVD_GRID),
                                                     "matrices": shipped.matrices}}, best, log))
    for keep in STUDY_KEEPS:   # the same merge of the default's τ̂ at a larger r
        wk = _default_points(ctxs, wins_rows, keep)
        if wk is None:
            log(f"no 'NPS that wins' default rows at r = {keep:g}: row nps-default-r{keep:g} skipped")
            continue
        pruned_k = lambda wk=wk, keep=keep: torch.stack(      # noqa: E731
            [default_pruned(c, r, keep) for c, r in zip(ctxs, wk)])
        row = cache.step(suite, "_merge_aware", f"nps-default-r{keep:g}",
                         {**base_params, "keep": keep, "points": [r["params"] for r in wk],
                          "settings": shipped_params}, lambda pf=pruned_k: two_stage(pf), log)
        out[f"nps-default-r{keep:g}"] = {**_strip(row), "keep": keep}
    lam_default = out["nps-default"]["lambda"]

    def collided():            # the default's λ_i, each entry left to one task (an ablation: no λ search)
        merged = nps_combine(pruned(), lam_default, shipped.normalize, "magnitude")
        return scored(merged, {"lambda": lam_default, "collide": "magnitude"})
    out["nps-default-collide"] = _strip(cache.step(suite, "_merge_aware", "nps-default-collide",
                                                   {**base_params, **points_src, "lambda": lam_default,
                                                    "collide": "magnitude"}, collided, log))

    def joint():
        lam0 = out["nps-default"]["lambda"]
        settings = shipped.replace(joint_generations=JOINT_GENERATIONS)
        t0 = time.perf_counter()
        pr, lambdas, result = joint_nps_merge(sessions, calibs, points(), lam0, settings=settings,
                                              progress=False)
        merged = nps_combine(pr, lambdas, settings.normalize)
        return scored(merged, {"lambda": [float(x) for x in lambdas], "generations": JOINT_GENERATIONS,
                               "two_stage_calib": out["nps-default"]["calib_mean"],
                               "joint_calib": float(result.best_score),
                               "examples_scored": sum(int(c.get("examples") or 0) for c in result.candidates),
                               "search_candidates": len(result.candidates), "search_s": time.perf_counter() - t0})
    out["nps-joint"] = _strip(cache.step(suite, "_merge_aware", "nps-joint",
                                         {**base_params, **points_src, "from": out["nps-default"]["lambda"],
                                          "gens": JOINT_GENERATIONS}, joint, log))
    out.update(_into_rows(suite, cfg, cache, log, base_params, points_src, sessions, calibs, scored,
                          taus, pruned))

    return {"suite": suite, "rows": out, "job_s": time.perf_counter() - t_job}


def _into_rows(suite, cfg, cache, log, base_params, points_src, sessions, calibs, scored, taus,
               pruned) -> Dict[str, dict]:
    """``nps-into-<m>`` / ``dare-into-<m>``: a slim τ̂ per task (the default NPS's, or DARE's at
    the same r) merged by the merge m with its λ chosen on the calibration rows."""
    import torch
    from nps_pruning.apps.merge import merge_with_lambda_grid
    from nps_pruning.apps.settings import MergeSettings
    from nps_pruning.core import PRUNERS
    from nps_pruning.core.prepared import prune_in_domain
    grids = {"task-arithmetic": cfg.ta_grid, "ties": cfg.ties_grid, "tsv-m": cfg.svd_grid, "iso-c": cfg.svd_grid}
    out: Dict[str, dict] = {}
    for source in ("nps", "dare"):
        for m in INTO:
            grid = tuple(sorted(set(grids[m]) | set(INTO_LOW)))
            settings = MergeSettings(seed=cfg.seed, keep_ratio=cfg.ties_keep, lambda_grid=grid)

            def row(m=m, source=source, settings=settings):
                slim = (pruned() if source == "nps" else
                        torch.stack([prune_in_domain(PRUNERS["dare"], t, MERGE_KEEP, s.domain, seed=cfg.seed)
                                     for t, s in zip(taus, sessions)]))
                merged, lam, g = merge_with_lambda_grid(m, slim, sessions, calibs, settings=settings)
                return scored(merged, {"lambda": lam, "grid": g, "keep": MERGE_KEEP, "pruner": source})
            src = points_src if source == "nps" else {"keep": MERGE_KEEP, "pruner": "dare"}
            key = f"{source}-into-{m}"
            out[key] = _strip(cache.step(suite, "_merge_aware", key,
                                         {**base_params, **src, "method": m, "grid": list(grid),
                                          "ties_keep": cfg.ties_keep, "seed": cfg.seed,
                                          **({"matrices": settings.matrices} if m in ("tsv-m", "iso-c")
                                             else {})}, row, log))
    return out
