"""The report's judgements, computed from the numbers: "Defaults chosen" (on *calibration* means;
test means are shown beside them), the σ0 and generations studies, and "Where NPS does not win"."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .labels import (FOCUSED, FOCUSED_LOG, FOCUSED_LONG, UNIFORM, is_merge_grid_label, nps_key, parse_merge_single,
                     sigma_variant, upper_variant)
from .report_common import (FUSION_LABELS, METHOD_LABELS, _defaults, _grid, _task_names, _test_rows, mean_se,
                            se, table)


def _paired(suites, key_a, key_b, keeps) -> Dict[str, Any]:
    """Mean calibration and test of two NPS variants over (suite, task, r) where both exist."""
    ca, cb, ta, tb, n = [], [], [], [], 0
    rows_used = []
    per_suite = {}
    for sname, S in suites.items():
        g = _grid(S)
        sa, sb = [], []
        for r in keeps:
            A, B = g.get((key_a, r), {}), g.get((key_b, r), {})
            for t in A:
                if t in B:
                    ca.append(A[t]["calib"]); cb.append(B[t]["calib"])
                    ta.append(A[t]["test"]); tb.append(B[t]["test"])
                    sa.append(A[t]["calib"]); sb.append(B[t]["calib"])
                    rows_used.append(int(S["tasks"][t]["finetuned"].get("calib_rows", 1)))
        if sa:
            per_suite[sname] = (float(np.mean(sa)), float(np.mean(sb)), len(sa))
    if not ca:
        return {}
    p = float(np.mean(ca))
    noise = se(p, sum(rows_used))
    return {"calib": (float(np.mean(ca)), float(np.mean(cb))), "test": (float(np.mean(ta)), float(np.mean(tb))),
            "n": len(ca), "per_suite": per_suite, "noise": noise}


def _above_two(suites: Dict[str, dict], cfg: dict) -> str:
    """How often the searches with the larger bound actually used a band weight above the smaller one."""
    lim = float(cfg.get("ablation_upper", 2.0))
    n, used, top = 0, 0, 0.0
    for S in suites.values():
        for tr in S["tasks"].values():
            for row in tr["pruning"]:
                if row["method"] == "nps" and row["variant"] in (FOCUSED, UNIFORM):
                    n += 1
                    w = max(row["weights"])
                    top = max(top, w)
                    used += w > lim
    if not n:
        return ""
    return (f" Of the {n} searches with upper bound {cfg.get('upper'):g}, {used} ended with some band weight "
            f"above {lim:g} (largest {top:.2f}): in {cfg.get('generations')} generations from w = 1 with "
            f"σ0 = {cfg.get('sigma0')} the search rarely reaches that far, so the bound seldom binds here.")


def defaults_section(results: dict, fig_rel: Optional[str] = None) -> str:
    suites = results["suites"]
    cfg = results["meta"].get("config", {})
    shipped = _defaults()
    keeps = cfg.get("ablation_keep_ratios", [])
    out = ["Chosen on **calibration** means (the data the search itself sees); the test means are shown beside "
           "them and chose nothing. `shipped` is the default in `src/nps_pruning/config.py` at render time.", ""]

    def margin(p):
        d = abs(p["calib"][0] - p["calib"][1])
        return (f" Margin {d:.4f} on calibration, against a standard error of about {p['noise']:.4f} for one "
                f"such mean ({'within' if d < 2 * p['noise'] else 'beyond'} 2 se).")

    def verdict(name, winner, shipped_value, p=None):
        if str(winner) == str(shipped_value):
            return f"the shipped default **{shipped_value}** agrees with these numbers."
        if p is not None and abs(p["calib"][0] - p["calib"][1]) < 2 * p["noise"]:
            return (f"these numbers lean to **{winner}** but within noise; the shipped default "
                    f"**{shipped_value}** is not contradicted, and changing it in `config.py` to **{winner}** "
                    "is what this run supports if a choice must follow the numbers.")
        return (f"these numbers favour **{winner}**{' beyond noise' if p is not None else ''}, but the shipped "
                f"default is **{shipped_value}**: change it in `config.py`.")

    ukeeps = cfg.get("uniform_keep_ratios") or keeps
    p = _paired(suites, nps_key(FOCUSED), nps_key(UNIFORM), ukeeps)
    if p:
        win = "focused" if p["calib"][0] >= p["calib"][1] else "uniform"
        out.append(f"- **Band scheme** (r ∈ {{{', '.join(f'{k:g}' for k in ukeeps)}}}, {p['n']} task×r pairs): "
                   f"calibration focused {p['calib'][0]:.4f} vs uniform {p['calib'][1]:.4f}; test "
                   f"{p['test'][0]:.4f} vs {p['test'][1]:.4f}. Per suite (calib): "
                   + "; ".join(f"{s} {a:.4f} vs {b:.4f}" for s, (a, b, _) in p["per_suite"].items())
                   + "." + margin(p) + f" Choice: {win}; " + verdict("scheme", win, shipped["scheme"], p))
    up_key = nps_key(upper_variant(cfg.get('ablation_upper', 2.0)))
    p = _paired(suites, nps_key(FOCUSED), up_key, keeps)
    if p:
        win = cfg.get("upper") if p["calib"][0] >= p["calib"][1] else cfg.get("ablation_upper")
        out.append(f"- **Upper bound of the band weights**: calibration upper {cfg.get('upper'):g} {p['calib'][0]:.4f} "
                   f"vs upper {cfg.get('ablation_upper'):g} (the paper's [0, 2]) {p['calib'][1]:.4f}; test "
                   f"{p['test'][0]:.4f} vs {p['test'][1]:.4f} ({p['n']} pairs)." + margin(p)
                   + _above_two(suites, cfg) + f" Choice: {win:g}; "
                   + verdict("upper", float(win), float(shipped["upper"]), p))
    p = _paired(suites, nps_key(FOCUSED), nps_key(FOCUSED_LOG), keeps)
    if p:
        win = "linear" if p["calib"][0] >= p["calib"][1] else "log"
        out.append(f"- **Parametrisation of the band weights**: calibration linear [0, {cfg.get('upper'):g}], "
                   f"σ0 {cfg.get('sigma0'):g} {p['calib'][0]:.4f} vs log2 in [{cfg.get('log_lower', 0.25):g}, "
                   f"{cfg.get('log_upper', 8.0):g}], σ0 {cfg.get('log_sigma0', 1.0):g} (in log2 units) "
                   f"{p['calib'][1]:.4f}; test {p['test'][0]:.4f} vs {p['test'][1]:.4f} ({p['n']} pairs)."
                   + margin(p) + f" Choice: {win}; " + verdict("param", win, shipped["param"], p))
    norms: Dict[str, List[float]] = {}
    norms_test: Dict[str, List[float]] = {}
    for sname, S in suites.items():
        fj = S.get("fusion")
        if not fj:
            continue
        for k, v in fj["fusion"].items():
            nm = parse_merge_single(k)
            if nm is not None:
                norms.setdefault(nm, []).append(v["calib_mean"])
                norms_test.setdefault(nm, []).append(v["test_mean"])
    if norms:
        means = {k: float(np.mean(v)) for k, v in norms.items()}
        win = max(means, key=means.get)
        out.append("- **NPS-merge normalisation** (best single λ, mean over suites): calibration "
                   + ", ".join(f"{k} {v:.4f}" for k, v in means.items()) + "; test "
                   + ", ".join(f"{k} {np.mean(v):.4f}" for k, v in norms_test.items())
                   + f". Choice: {win}; " + verdict("normalize", win, shipped["normalize"]))
    # σ0
    sg = sigma0_study(suites, cfg)
    if sg:
        win = max(sg["calib"], key=sg["calib"].get)
        out.append(f"- **σ0** (initial CMA-ES step, linear parametrisation; NPS focused at r ∈ "
                   f"{{{', '.join(f'{k:g}' for k in sg['keeps'])}}}, {sg['n']} tasks): calibration "
                   + ", ".join(f"σ0 {k:g} {v:.4f}" for k, v in sg["calib"].items()) + "; test "
                   + ", ".join(f"σ0 {k:g} {v:.4f}" for k, v in sg["test"].items())
                   + ". Per suite (calib): " + "; ".join(
                       f"{sn} " + ", ".join(f"σ0 {k:g} {v:.4f}" for k, v in d.items())
                       for sn, d in sg["per_suite"].items())
                   + f". Spread {max(sg['calib'].values()) - min(sg['calib'].values()):.4f} on calibration, against "
                   f"a standard error of about {sg['noise']:.4f} for one such mean. Choice: {win:g}; "
                   + verdict("sigma0", f"{win:g}", f"{float(shipped['sigma0']):g}",
                             {"calib": (sg["calib"][win], sg["calib"].get(float(shipped["sigma0"]), -1.0)),
                              "noise": sg["noise"]}))
    # generations
    gs = generations_study(suites, cfg)
    if gs:
        pooled = gs["pooled"]
        rows = [[g, gs["candidates"].get(g, ""), f"{pooled[g][0]:.4f}", f"{pooled[g][1]:.4f}"]
                + [f"{gs['per_suite'][sn][g][0]:.4f} / {gs['per_suite'][sn][g][1]:.4f}" for sn in gs["per_suite"]]
                for g in gs["gens"]]
        g0, gmax, ch = gs["gens"][0], gs["gens"][-1], gs["chosen"]
        same = gs["consistent"]
        out.append(f"- **Generations** (one NPS focused search of {gmax} generations of {cfg.get('popsize')} per task "
                   f"at r = {cfg.get('long_keep'):g}, {gs['n']} tasks; the best-so-far candidate after each "
                   "generation below is what a search stopped there returns, and was scored on test). From "
                   f"generation {g0} to {gmax} the mean calibration accuracy rises {pooled[g0][0]:.4f} → "
                   f"{pooled[gmax][0]:.4f} and the test accuracy {pooled[g0][1]:.4f} → {pooled[gmax][1]:.4f}. "
                   f"Rule: the fewest generations that reach 90% of the calibration gain of {gmax} generations. "
                   f"Choice: {ch} (test there {pooled[ch][1]:.4f}, against {pooled[gmax][1]:.4f} after {gmax}); "
                   + (verdict("generations", ch, shipped["generations"]) if ch < gmax else
                      f"the mean curve has not flattened by {gmax} generations, so these numbers support at least "
                      f"{gmax}; the shipped default **{shipped['generations']}** "
                      + ("agrees with them." if int(shipped["generations"]) >= gmax
                         else "is below that: change it in `config.py`."))
                   + " Per suite, by the same rule: "
                   + ", ".join(f"{sn} {c}" for sn, c in gs["chosen_per_suite"].items()) + "."
                   + f" The shipped population is the library's 4 + ⌊3 ln M⌋ (10 for M = 8), against "
                   f"{cfg.get('popsize')} here, so the shipped search scores a few more candidates per generation."
                   + (f" Check: after {cfg.get('generations')} generations these searches hold exactly the band "
                      f"weights of the grid's {cfg.get('generations')}-generation searches at the same r "
                      f"({same[0]} of {same[1]} tasks)." if same else ""))
        out += ["", table(["generation", "candidates", "calib (mean)", "test (mean)"]
                          + [f"{sn}: calib / test" for sn in gs["per_suite"]], rows)]
        if fig_rel:
            out += ["", f"![calibration and test accuracy against generations]({fig_rel}/generations.png)"]
    last, final_gain, improved, total = [], 0, 0, 0
    for S in suites.values():
        for tr in S["tasks"].values():
            for row in tr["pruning"]:
                if row["method"] != "nps" or row["variant"] == FOCUSED_LONG:
                    continue
                b = row["best_so_far"]
                total += 1
                li = max([i for i in range(1, len(b)) if b[i] > b[i - 1]], default=0)
                last.append(li)
                if li == len(b) - 1:
                    final_gain += 1
                if b[-1] > b[0]:
                    improved += 1
    if total:
        out.append("")
        out.append(f"- **The grid's searches** ({cfg.get('generations')} generations of {cfg.get('popsize')}): of "
                   f"the {total} search curves, the best-so-far calibration score last improved at generation "
                   f"{np.mean(last):.1f} on average (0 = the w = 1 start); {final_gain} of {total} still improved "
                   f"in their last generation; {improved} of {total} ended above plain magnitude top-k on "
                   "calibration.")
    return "\n".join(out)


def sigma0_study(suites: Dict[str, dict], cfg: dict) -> Optional[dict]:
    """Mean calibration / test of NPS focused at each σ0 over the tasks where all were searched."""
    sigmas = sorted({float(cfg.get("sigma0", 0.3))} | {float(x) for x in cfg.get("sigma0_ablation") or []})
    keeps = cfg.get("sigma0_keep_ratios") or []
    if len(sigmas) < 2 or not keeps:
        return None
    key = {s: (nps_key(FOCUSED) if s == float(cfg.get("sigma0", 0.3)) else nps_key(sigma_variant(s))) for s in sigmas}
    calib = {s: [] for s in sigmas}
    test = {s: [] for s in sigmas}
    rows_used = []
    per_suite: Dict[str, Dict[float, List[float]]] = {}
    for sname, S in suites.items():
        g = _grid(S)
        for r in keeps:
            by = {s: g.get((key[s], r), {}) for s in sigmas}
            for t in _task_names(S):
                if all(t in by[s] for s in sigmas):
                    for s in sigmas:
                        calib[s].append(by[s][t]["calib"])
                        test[s].append(by[s][t]["test"])
                        per_suite.setdefault(sname, {}).setdefault(s, []).append(by[s][t]["calib"])
                    rows_used.append(int(S["tasks"][t]["finetuned"].get("calib_rows", 1)))
    if not rows_used:
        return None
    cm = {s: float(np.mean(v)) for s, v in calib.items()}
    p = float(np.mean(list(cm.values())))
    return {"calib": cm, "test": {s: float(np.mean(v)) for s, v in test.items()}, "n": len(rows_used),
            "keeps": keeps, "noise": se(p, sum(rows_used)),
            "per_suite": {sn: {s: float(np.mean(v)) for s, v in d.items()} for sn, d in per_suite.items()}}


def _long_rows(S: dict) -> List[Tuple[str, dict]]:
    out = []
    for n in _task_names(S):
        for row in S["tasks"][n]["pruning"]:
            if row["method"] == "nps" and row["variant"] == FOCUSED_LONG and row.get("checkpoints"):
                out.append((n, row))
    return out


def generations_study(suites: Dict[str, dict], cfg: dict) -> Optional[dict]:
    """Mean (calib, test) of the best-so-far after each checkpoint generation, per suite and pooled."""
    per_task: Dict[str, Dict[str, Dict[int, dict]]] = {}
    for sname, S in suites.items():
        for n, row in _long_rows(S):
            per_task.setdefault(sname, {})[n] = {int(c["generation"]): c for c in row["checkpoints"]}
    if not per_task:
        return None
    gens = sorted(set.intersection(*[set(cp) for by in per_task.values() for cp in by.values()]))
    if not gens:
        return None

    def means(cps):
        return {g: (float(np.mean([cp[g]["calib"] for cp in cps])), float(np.mean([cp[g]["test"] for cp in cps])))
                for g in gens}
    every = [cp for by in per_task.values() for cp in by.values()]
    pooled = means(every)
    def choose(m):      # the fewest generations reaching 90% of the calibration gain of the longest
        gain = m[gens[-1]][0] - m[gens[0]][0]
        return next(g for g in gens if m[g][0] - m[gens[0]][0] >= 0.9 * gain - 1e-12)
    chosen = choose(pooled)
    per_suite = {s: means(list(by.values())) for s, by in per_task.items()}
    # the long searches' first `generations` generations are the grid's searches: same best weights?
    G, keep = int(cfg.get("generations", 0)), cfg.get("long_keep")
    same, total = 0, 0
    for sname, by in per_task.items():
        g = _grid(suites[sname])
        for n, cp in by.items():
            grid_row = g.get((nps_key(FOCUSED), keep), {}).get(n)
            if grid_row is not None and G in cp:
                total += 1
                same += list(cp[G]["weights"]) == list(grid_row["weights"])
    cands = {g: every[0][g].get("candidates") for g in gens}
    return {"gens": gens, "pooled": pooled, "per_suite": per_suite,
            "chosen": chosen, "chosen_per_suite": {s: choose(m) for s, m in per_suite.items()}, "n": len(every), "candidates": cands,
            "consistent": (same, total) if total else None}


def losses_section(results: dict) -> str:
    suites = results["suites"]
    items = []
    for sname, S in suites.items():
        g = _grid(S)
        names = _task_names(S)
        ns = [_test_rows(S, n) for n in names]
        for (key, r), by in sorted(g.items(), key=lambda kv: kv[0][1]):
            if key != nps_key(FOCUSED) or not all(n in by for n in names):
                continue
            m_nps, s_nps = mean_se([by[n]["test"] for n in names], ns)
            for other in ("magnitude", "dare"):
                ob = g.get((other, r), {})
                if all(n in ob for n in names):
                    m_o, _ = mean_se([ob[n]["test"] for n in names], ns)
                    if m_nps < m_o:
                        items.append(f"{sname}, pruning r = {r:g}: NPS focused {m_nps:.4f} < "
                                     f"{METHOD_LABELS[other]} {m_o:.4f} (Δ {m_nps - m_o:+.4f}, se of NPS's mean "
                                     f"{s_nps:.4f})")
            for n in names:
                for other in ("magnitude", "dare"):
                    o = g.get((other, r), {}).get(n)
                    if o and by[n]["test"] < o["test"]:
                        items.append(f"{sname}/{n}, pruning r = {r:g}: NPS focused {by[n]['test']:.4f} < "
                                     f"{METHOD_LABELS[other]} {o['test']:.4f}")
        fj = S.get("fusion")
        if fj:
            F = fj["fusion"]
            if "NPS-merge" in F:
                nps = F["NPS-merge"]["test_mean"]
                for k in ("average", "task-arithmetic", "ties", "dare-ties"):
                    if k in F and F[k]["test_mean"] > nps:
                        items.append(f"{sname}, fusion: NPS-merge {nps:.4f} < {FUSION_LABELS[k]} {F[k]['test_mean']:.4f}")
                for k, v in F.items():
                    if is_merge_grid_label(k) and v["test_mean"] > nps:
                        items.append(f"{sname}, fusion: the per-task λ search ({nps:.4f}) is below {k} "
                                     f"({v['test_mean']:.4f}) on test")
            rows = {r["method"]: r for r in fj["compression"]["rows"]}
            for r in fj["compression"]["rows"]:
                if not r["method"].startswith("NPS"):
                    continue
                for k in ("task arithmetic", "TIES"):
                    o = rows.get(k)
                    if o and o["normalized_mean"] > r["normalized_mean"]:
                        items.append(f"{sname}, compression: {r['method']} normalized accuracy "
                                     f"{r['normalized_mean']:.4f} < {k} {o['normalized_mean']:.4f}")
                    if o and o["mb"] < r["mb"]:
                        items.append(f"{sname}, compression: {r['method']} needs {r['mb']:.1f} MB, more than "
                                     f"{k}'s single merged model ({o['mb']:.1f} MB)")
        for tname, tr in (S.get("transfer") or {}).items():
            rows = {r["method"]: r for r in tr["rows"]}
            if "nps" in rows:
                for k in ("dare", "magnitude", "fine-tuned", "pre-trained"):
                    if k in rows and rows[k]["h_score"] > rows["nps"]["h_score"]:
                        items.append(f"{sname}/{tname}, transfer: NPS H-score {rows['nps']['h_score']:.4f} < "
                                     f"{k} {rows[k]['h_score']:.4f}")
    if not items:
        return "NPS did not lose any comparison in this run."
    return "\n".join(f"- {i}" for i in items)
