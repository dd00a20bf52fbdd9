"""Exploration (not a benchmark step; run from the repository root as
``PYTHONPATH=src:benchmarks python benchmarks/explore_seed_lottery.py --suite text``): how much
does the random part's seed move the default's test accuracy at a fixed search point, and do the
calibration rows see it?

Takes each committed default search (hybrid v2, on the checkpoint built on ``--cpu``), rebuilds
its pick from its params with seeds 0 .. K−1 (seed 0 must reproduce the recorded test score: the
random part's order and exponentials come from the seed; the bands and weights stay), and scores
each seed on the default's held-out rows, on every calibration row (both loglik-t, the shipped
fitness) and on test. Prints per task and r the seeds' scores, the test of the seed each rule
would pick, and the correlation of calibration and test over the seeds; then the means.
A point without a random part (α = 0) is the same for every seed and is skipped."""
import argparse
import glob
import json

import numpy as np

from nps_bench.explore import explore_tasks
from nps_pruning.apps.settings import PruneSettings
from nps_pruning.evaluation import DEFAULT_FITNESS

ap = argparse.ArgumentParser()
ap.add_argument("--suite", default="text")
ap.add_argument("--keeps", default="0.005,0.01")
ap.add_argument("--seeds", type=int, default=8)
ap.add_argument("--tasks", default=None)
ap.add_argument("--cpu", default="AMD EPYC", help="the committed steps computed on this CPU model")
args = ap.parse_args()
keeps = [float(k) for k in args.keeps.split(",")]
means: dict = {}
st = PruneSettings()
for task, ml, s, test in explore_tasks(args.suite, args.tasks):
    calib = s.evaluator(task["eval_calib"], fitness=st.fitness or DEFAULT_FITNESS, batch_size=64, max_length=ml)
    _, hold = s.search_evaluators(task["eval_calib"], fitness=st.fitness or DEFAULT_FITNESS, holdout=st.holdout,
                                  seed=st.seed, batch_size=64, max_length=ml,
                                  holdout_min_rows=st.holdout_min_rows)
    steps = f"benchmarks/results/steps/{args.suite}/{task['name']}"
    for r in keeps:
        recs = [json.load(open(p)) for p in glob.glob(f"{steps}/wins-nps-default-r{r:g}-*.json")]
        recs = [x for x in recs if x.get("_cpu") == args.cpu and x["_code"].get("hybrid") == 2]
        if not recs:
            print(task["name"], r, "no committed hybrid-v2 default step", flush=True)
            continue
        d = max(recs, key=lambda x: x["_date"])
        p = d["params"]
        if len(p) < 12 or p[9] <= 0:
            print(task["name"], r, "no random part (alpha = 0): skipped", flush=True)
            continue
        rows = []
        for seed in range(args.seeds):
            tau = s.prepared(st.replace(keep_ratio=r, max_length=ml, seed=seed)).build(p)
            rows.append((seed, s.score(hold, tau), s.score(calib, tau), s.score(test, tau)))
        te = np.array([x[3] for x in rows])
        ho = np.array([x[1] for x in rows])
        ca = np.array([x[2] for x in rows])
        same = abs(te[0] - d["test"]) < 1e-9
        pick_h, pick_c = int(np.argmax(ho)), int(np.argmax(ca))
        for k, v in (("seed0", te[0]), ("held-out pick", te[pick_h]), ("calib pick", te[pick_c]),
                     ("seed mean", te.mean()), ("oracle", te.max())):
            means.setdefault((r, k), []).append(float(v))
        print(f"{task['name']} r={r:g} alpha={p[9]:.2f} beta={p[11]:.2f} seed0 test {te[0]:.4f} "
              f"({'reproduced' if same else 'MISMATCH ' + str(d['test'])}); test over seeds "
              f"{' '.join(f'{x:.3f}' for x in te)} (sd {te.std():.4f}); held-out pick seed {pick_h} "
              f"-> {te[pick_h]:.4f}, all-calib pick seed {pick_c} -> {te[pick_c]:.4f}; "
              f"corr(held-out, test) {np.corrcoef(ho, te)[0, 1]:.2f}, corr(calib, test) "
              f"{np.corrcoef(ca, te)[0, 1]:.2f}", flush=True)
for r in keeps:
    print("mean r", r, " ".join(f"{k}={np.mean(v):.4f} (n={len(v)})" for (rr, k), v in means.items() if rr == r),
          flush=True)
