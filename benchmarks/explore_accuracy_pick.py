"""Exploration (not a benchmark step; run from the repository root as
``python benchmarks/explore_accuracy_pick.py --suite text --rows holdout``): would choosing the
default search's finalist by calibration *accuracy* (instead of the held-out log-likelihood) do
better on test? Reads the committed wins step files' finalists (the generation-0 start points and
the best distinct candidates the default re-scores), scores each by accuracy on the held-out rows
the default used (``--rows holdout``: no more rows than the default's own re-scoring) or on every
calibration row (``--rows all``), and tests the pick (ties: the held-out log-likelihood, then the
earlier finalist). Prints per task and the mean per r, beside the shipped pick and the
baselines."""
import argparse
import glob
import json

import numpy as np

from nps_bench.context import task_dict
from nps_bench.suites import build_suite
from nps_pruning.apps.session import Session
from nps_pruning.apps.settings import PruneSettings
from nps_pruning.evaluation import make_evaluator

ap = argparse.ArgumentParser()
ap.add_argument("--suite", default="vision")
ap.add_argument("--keeps", default="0.01,0.02,0.05,0.1,0.2,0.3")
ap.add_argument("--rows", choices=("holdout", "all"), default="holdout")
args = ap.parse_args()
keeps = [float(k) for k in args.keeps.split(",")]
wins = json.load(open("benchmarks/results/wins.json"))["suites"][args.suite]["tasks"]
suite = build_suite(args.suite)
out = {}
for t in suite.tasks:
    task = task_dict(t)
    max_length = task.get("max_length") or 128
    s = Session.load(task["base"], task["finetuned"], model_factory=task.get("model_factory"), name=task["name"])
    test = make_evaluator(task["eval_test"], model_path=task["finetuned"], calib_size=1000, seed=0,
                          batch_size=64, max_length=max_length)
    if args.rows == "all":
        pick_ev = make_evaluator(task["eval_calib"], model_path=task["finetuned"], calib_size=None, seed=0,
                                 batch_size=64, max_length=max_length)
    else:     # the default's own held-out rows (PruneSettings(): hold-out 0.25, seed 0), by accuracy
        st = PruneSettings()
        _, pick_ev = s.search_evaluators(task["eval_calib"], fitness="accuracy", holdout=st.holdout,
                                         seed=st.seed, batch_size=64, max_length=max_length,
                                         holdout_min_rows=st.holdout_min_rows)
    for r in keeps:
        rows = {x["method"]: x for x in wins[task["name"]] if x["keep"] == r}
        if "nps-default" not in rows:
            continue
        f = [p for p in glob.glob(f"benchmarks/results/steps/{args.suite}/{task['name']}/wins-nps-default-r{r:g}-*.json")
             if json.load(open(p))["_date"] == rows["nps-default"]["_date"]][0]
        d = json.load(open(f))
        prep = s.prepared(PruneSettings().replace(keep_ratio=r, max_length=max_length))
        accs = [s.score(pick_ev, prep.build(c["weights"])) for c in d["rescored"]]
        i = max(range(len(accs)), key=lambda j: (accs[j], d["rescored"][j]["holdout_score"], -j))
        t_acc = s.score(test, prep.build(d["rescored"][i]["weights"]))
        ship = max(range(len(accs)), key=lambda j: (d["rescored"][j]["holdout_score"],
                                                    d["rescored"][j]["search_score"], -j))
        same = abs(s.score(test, prep.build(d["rescored"][ship]["weights"])) - rows["nps-default"]["test"]) < 1e-9
        out[(task["name"], r)] = (rows["nps-default"]["test"], t_acc, rows["dare"]["test"],
                                  rows["magnitude-rescaled"]["test"])
        print(task["name"], r, "default", round(rows["nps-default"]["test"], 4), "acc-pick", round(t_acc, 4),
              "dare", round(rows["dare"]["test"], 4), "tuned", round(rows["magnitude-rescaled"]["test"], 4),
              d["rescored"][i].get("start"), "(shipped pick reproduced)" if same else "(MISMATCH)", flush=True)
for r in keeps:
    v = np.array([out[(t.name, r)] for t in suite.tasks if (t.name, r) in out])
    if len(v):
        print("mean r", r, "default %.4f acc-pick %.4f dare %.4f tuned-rescale %.4f" % tuple(v.mean(0)))
