"""Exploration (not a benchmark step; run from the repository root as
``PYTHONPATH=src:benchmarks python benchmarks/explore_rank_power.py --suite text``): where DELLA
beats the default on text (r = 0.005–0.01), is a one-parameter family between DARE and magnitude
top-k the room the hybrid space lacks?

Rank-power sampling: entry j of τ (rank_j = 0 for the smallest |τ_j|, D − 1 for the largest) is
kept independently with probability p_j = min(1, c·(rank_j/(D−1))^β), c solved so Σ p_j = r·D,
and carries τ_j / p_j (unbiased, Horvitz–Thompson). β = 0 is DARE's uniform drop (in
expectation), β = 1 is DELLA's MAGPRUNE at small r (p_j linear in the rank, ε = 2r), and large β
tends to magnitude top-k (p_j → 1 on the top ranks, no rescale). Prints per task and r the test
accuracy of each β (and of a ×2 rescale on top, `x2`), the calibration score the default's fitness
gives it (loglik-t on every calibration row), and the committed wins baselines beside them.

``--pick``: the default with these points as extra finalists. Takes each committed default search
(search v2 with the patience gap, on the checkpoint built on ``--cpu``), rebuilds its pick from
its params (its test score must reproduce), scores it and the rank-power points of ``--betas`` on
the default's own held-out rows (loglik-t, the shipped re-scoring rule) and tests the best there:
what `nps prune` would give if its re-scoring also saw these points."""
import argparse
import glob
import json

import numpy as np
import torch

from nps_bench.explore import explore_tasks
from nps_pruning.core.prepared import prune_in_domain


def rank_power(v: torch.Tensor, r: float, seed: int, beta: float) -> torch.Tensor:
    D = v.numel()
    k = r * D
    ranks = torch.empty(D, dtype=torch.float64)
    ranks[torch.argsort(v.abs(), stable=True)] = torch.arange(D, dtype=torch.float64)
    base = (ranks / max(D - 1, 1)) ** beta if beta > 0 else torch.ones(D, dtype=torch.float64)
    lo, hi = 0.0, 1.0
    while float(torch.clamp(hi * base, max=1.0).sum()) < k:     # bracket c, then bisect
        hi *= 2.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if float(torch.clamp(mid * base, max=1.0).sum()) < k:
            lo = mid
        else:
            hi = mid
    p = torch.clamp(hi * base, max=1.0)
    u = torch.rand(D, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)
    kept = u < p
    out = torch.zeros_like(v)
    out[kept] = (v[kept].double() / p[kept]).to(v.dtype)
    return out


ap = argparse.ArgumentParser()
ap.add_argument("--suite", default="text")
ap.add_argument("--keeps", default="0.005,0.01")
ap.add_argument("--betas", default="0,1,2,4,8")
ap.add_argument("--tasks", default=None)
ap.add_argument("--pick", action="store_true")
ap.add_argument("--cpu", default="AMD EPYC", help="the committed baselines computed on this CPU model")
args = ap.parse_args()
keeps = [float(k) for k in args.keeps.split(",")]
betas = [float(b) for b in args.betas.split(",")]
means: dict = {}
for task, ml, s, test in explore_tasks(args.suite, args.tasks):
    calib = s.evaluator(task["eval_calib"], fitness="loglik-t", batch_size=64, max_length=ml)
    steps = f"benchmarks/results/steps/{args.suite}/{task['name']}"

    def committed(name):
        recs = [json.load(open(p)) for p in glob.glob(f"{steps}/{name}-*.json")]
        here = [x for x in recs if x.get("_cpu") == args.cpu]      # the checkpoint built on this CPU
        recs = here or recs
        return max(recs, key=lambda x: x["_date"])["test"] if recs else float("nan")
    if args.pick:
        from nps_pruning.apps.settings import PruneSettings
        st = PruneSettings()
        _, hold = s.search_evaluators(task["eval_calib"], fitness=st.fitness, holdout=st.holdout,
                                      seed=st.seed, batch_size=64, max_length=ml,
                                      holdout_min_rows=st.holdout_min_rows)
        for r in keeps:
            recs = [json.load(open(p)) for p in glob.glob(f"{steps}/wins-nps-default-r{r:g}-*.json")]
            recs = [x for x in recs if x.get("_cpu") == args.cpu and x["_code"].get("search") == 2
                    and (x["_params"].get("shipped") or {}).get("search", {}).get("patience_gap")]
            if not recs:
                continue
            d = max(recs, key=lambda x: x["_date"])
            tau_d = s.prepared(st.replace(keep_ratio=r, max_length=ml)).build(d["params"])
            same = abs(s.score(test, tau_d) - d["test"]) < 1e-9
            cands = {"default": (s.score(hold, tau_d), tau_d)}
            for b in betas:
                tau = prune_in_domain(lambda v, rr, seed, b=b: rank_power(v, rr, seed, b),
                                      s.task_vector.values, r, s.domain, seed=0)
                cands[f"b{b:g}"] = (s.score(hold, tau), tau)
            best = max(cands, key=lambda c: cands[c][0])
            acc = d["test"] if best == "default" else s.score(test, cands[best][1])
            means.setdefault((r, "default"), []).append(d["test"])
            means.setdefault((r, "portfolio"), []).append(acc)
            print(task["name"], r, "default", d["test"], "(reproduced)" if same else "(MISMATCH)",
                  "held-out", {c: round(v[0], 4) for c, v in cands.items()}, "pick", best, round(acc, 4),
                  flush=True)
        continue
    for r in keeps:
        line = []
        for b in betas:
            tau = prune_in_domain(lambda v, rr, seed, b=b: rank_power(v, rr, seed, b), s.task_vector.values,
                                  r, s.domain, seed=0)
            for scale, tag in ((1.0, ""), (2.0, "x2")):
                acc = s.score(test, tau, scale)
                cal = s.score(calib, tau, scale)
                means.setdefault((r, f"b{b:g}{tag}"), []).append(acc)
                line.append(f"b{b:g}{tag} {acc:.3f} ({cal:.3f})")
        base = {m: committed(f"wins-{m}-r{r:g}") for m in ("dare", "della", "magnitude-rescaled")}
        for m, v in base.items():
            means.setdefault((r, m), []).append(v)
        print(task["name"], r, " | ".join(line), "| committed:", {m: round(v, 3) for m, v in base.items()},
              flush=True)
for r in keeps:
    print("mean r", r, " ".join(f"{k}={np.mean(v):.4f}" for (rr, k), v in means.items() if rr == r), flush=True)
