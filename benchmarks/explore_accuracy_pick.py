"""Exploration (not a benchmark step; run as `python benchmarks/explore_accuracy_pick.py` from the repository root): would choosing the default search's finalist by calibration
accuracy (instead of the held-out log-likelihood) close the MobileNetV2 regret? Uses the committed
wins step files' finalists; scores each on all calibration rows (accuracy) and tests the pick."""
import glob
import json
import numpy as np
from nps_bench.suites import build_suite
from nps_bench.context import task_dict
from nps_pruning.apps.session import Session
from nps_pruning.apps.settings import PruneSettings
from nps_pruning.evaluation import make_evaluator

wins = json.load(open("benchmarks/results/wins.json"))["suites"]["vision"]["tasks"]
suite = build_suite("vision")
out = {}
for t in suite.tasks:
    task = task_dict(t)
    s = Session.load(task["base"], task["finetuned"], model_factory=task.get("model_factory"), name=task["name"])
    test = make_evaluator(task["eval_test"], model_path=task["finetuned"], calib_size=1000, seed=0, batch_size=64)
    calib = make_evaluator(task["eval_calib"], model_path=task["finetuned"], calib_size=None, seed=0, batch_size=64)
    for r in (0.01, 0.02, 0.05, 0.1, 0.2, 0.3):
        row = next(x for x in wins[task["name"]] if x["method"] == "nps-default" and x["keep"] == r)
        resc = next(x for x in wins[task["name"]] if x["method"] == "magnitude-rescaled" and x["keep"] == r)
        f = [p for p in glob.glob(f"benchmarks/results/steps/vision/{task['name']}/wins-nps-default-r{r:g}-*.json")
             if json.load(open(p))["_date"] == row["_date"]][0]
        d = json.load(open(f))
        prep = s.prepared(PruneSettings().replace(keep_ratio=r))
        accs = []
        for c in d["rescored"]:
            accs.append(s.score(calib, prep.build(c["weights"])))
        i = max(range(len(accs)), key=lambda j: (accs[j], d["rescored"][j]["holdout_score"], -j))
        t_acc = s.score(test, prep.build(d["rescored"][i]["weights"]))
        out[(task["name"], r)] = (row["test"], t_acc, resc["test"])
        print(task["name"], r, "default", round(row["test"], 4), "acc-pick", round(t_acc, 4),
              "tuned-rescale", round(resc["test"], 4), d["rescored"][i].get("start"), flush=True)
for r in (0.01, 0.02, 0.05, 0.1, 0.2, 0.3):
    v = np.array([out[(t.name, r)] for t in suite.tasks])
    print("mean r", r, "default %.4f acc-pick %.4f tuned-rescale %.4f" % tuple(v.mean(0)))
