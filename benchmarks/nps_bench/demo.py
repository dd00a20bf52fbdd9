"""`nps demo`: the embedded default on the shipped real benchmark (SPEC §4), quickly.

Builds (or reuses from the cache) all-MiniLM-L6-v2 fine-tuned on two real text tasks, then:
1. prunes each task vector to 5% with magnitude top-k, DARE and NPS, scored on held-out test rows;
2. merges the two tasks with task arithmetic, TIES and NPS-merge.
It prints one table and writes report.json next to it. ``--quick`` is the CI-sized smoke version.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List

import numpy as np

from nps_pruning.apps.settings import MergeSettings, PruneSettings
from nps_pruning.report.report import now_iso, versions, write_json

DEMO_TASKS = ("rt-sentiment", "tweet-sentiment")


def _se(acc: float, n: int) -> float:
    return float(np.sqrt(max(acc * (1 - acc), 0.0) / max(n, 1)))


def run_demo(opts) -> Dict:
    from nps_pruning.apps.merge import merge_with_lambda_grid, merged_scores, nps_merge_lambdas
    from nps_pruning.apps.prune import Session, prune
    from nps_pruning.core.merge import nps_combine
    from nps_pruning.task_vector import stack_values
    from .suites import build_suite

    t0 = time.perf_counter()
    profile = "quick" if opts.quick else "demo"
    print(f"nps demo ({profile}): building or reusing the fine-tuned MiniLM models ...", flush=True)
    suite = build_suite("text", tasks=list(DEMO_TASKS), profile=profile, progress=True)
    keep = 0.05
    # `nps prune` with no flags (every calibration row, 25% held out; the shipped search), but
    # for the models' max length; the quick (CI) profile cuts the search to 2 generations of 4
    settings = PruneSettings(keep_ratio=keep, seed=0, max_length=64)
    if opts.quick:
        settings = settings.replace(generations=2, popsize=4)
    sessions, calib_evals, test_evals = [], [], []
    rows: List[Dict] = []
    pruned = []
    for task in suite.tasks:
        s = Session.load(suite.base, task.finetuned, name=task.name)
        sessions.append(s)
        calib = s.evaluator(task.eval_calib, calib_size=settings.calib_size,
                            **settings.evaluator_kwargs())
        test = s.evaluator(task.eval_test, **settings.evaluator_kwargs())
        calib_evals.append(calib)
        test_evals.append(test)
        st = settings.search
        stop = (f", stopped after {st.patience} without a gain > {st.min_gain:g} (not before "
                f"{st.min_generations})" if st.patience and st.min_gain is not None and st.generations > st.min_generations else "")
        print(f"[{task.name}] NPS search: up to {st.generations} generations{stop} on "
              f"{calib.num_rows} calibration rows", flush=True)
        out = prune(s, "nps", settings=settings, eval_spec=task.eval_calib)
        pruned.append(out.pruned)
        tv = s.task_vector
        row = {"task": task.name, "test_rows": test.num_rows,
               "finetuned": s.score(test, tv.values)}
        from nps_pruning.core import PRUNERS
        from nps_pruning.core.prepared import prune_in_domain
        for method in ("magnitude", "dare"):
            row[method] = s.score(test, prune_in_domain(PRUNERS[method], tv.values, keep, s.domain, seed=0))
        row["nps"] = s.score(test, out.pruned)
        row["nps_weights"] = [round(float(w), 3) for w in out.search.best_weights]
        row["calibration"] = out.calibration
        rows.append(row)

    msettings = MergeSettings(keep_ratio=keep, seed=0, lambda_generations=1 if opts.quick else 3,
                              lambda_grid=[1.0, 1.6] if opts.quick else [1.0, 1.4, 1.8, 2.2])
    taus = stack_values([s.task_vector for s in sessions])
    merges: Dict[str, Dict] = {}
    for method, label in (("task-arithmetic", "task arithmetic"), ("ties", "TIES")):
        print(f"merging with {label}: choosing λ on calibration data", flush=True)
        grid_settings = msettings.replace(keep_ratio=0.2, lambda_grid=[0.3, 0.6, 0.9]
                                          if method == "task-arithmetic" else msettings.lambda_grid)
        merged, lam, _ = merge_with_lambda_grid(method, taus, sessions, calib_evals,
                                                settings=grid_settings)
        merges[label] = {"lambda": lam, "test": merged_scores(sessions, test_evals, merged)}
    import torch
    print("merging with NPS-merge: λ grid, then a CMA-ES search of per-task λ", flush=True)
    lambdas, _, _ = nps_merge_lambdas(sessions, calib_evals, torch.stack(pruned), settings=msettings,
                                      progress=True)
    merged = nps_combine(torch.stack(pruned), lambdas, msettings.normalize)
    merges["NPS-merge"] = {"lambda": lambdas, "test": merged_scores(sessions, test_evals, merged)}

    _print_tables(rows, merges, [t.name for t in suite.tasks], keep)
    report = {"command": "demo", "created": now_iso(), "profile": profile, "versions": versions(),
              "keep_ratio": keep, "pruning": rows, "merging": merges,
              "suite": suite.to_dict(), "seconds": time.perf_counter() - t0}
    Path(opts.output).mkdir(parents=True, exist_ok=True)
    write_json(Path(opts.output) / "report.json", report)
    print(f"\n{time.perf_counter() - t0:.0f} s; report: {Path(opts.output) / 'report.json'}")
    return report


def _print_tables(rows, merges, names, keep) -> None:
    print(f"\nPruning to {keep:.0%} of the task vector - test accuracy (± standard error)")
    print(f"{'task':18s} {'fine-tuned':>16s} {'magnitude':>16s} {'DARE':>16s} {'NPS':>16s}")
    for r in rows:
        n = r["test_rows"]
        cells = [f"{r[k]:.4f} ±{_se(r[k], n):.3f}" for k in ("finetuned", "magnitude", "dare", "nps")]
        print(f"{r['task']:18s} " + " ".join(f"{c:>16s}" for c in cells))
    means = {k: float(np.mean([r[k] for r in rows])) for k in ("finetuned", "magnitude", "dare", "nps")}
    print(f"{'mean':18s} " + " ".join(f"{means[k]:>16.4f}" for k in ("finetuned", "magnitude", "dare", "nps")))
    print(f"\nMerging {len(names)} tasks into one model - test accuracy")
    print(f"{'method':18s} " + " ".join(f"{n:>16s}" for n in names) + f" {'mean':>8s}")
    for label, m in merges.items():
        print(f"{label:18s} " + " ".join(f"{v:16.4f}" for v in m["test"]) + f" {np.mean(m['test']):8.4f}")
