"""BENCHMARKS.md from the results JSON: ``render(results) -> markdown`` (+ PNG figures).

Everything printed here is computed from ``results`` (what :mod:`.run` wrote): tables, the
"Defaults chosen" section (chosen on *calibration* means; test means are shown beside them) and the
"Where NPS does not win" list.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

METHOD_LABELS = {"magnitude": "magnitude", "dare": "DARE", "random": "random"}


# ------------------------------------------------------------------ small helpers
def se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / max(int(n), 1))


def mean_se(ps: Sequence[float], ns: Sequence[int]) -> Tuple[float, float]:
    """Mean over tasks and its standard error sqrt(Σ se_i²)/T (tasks independent)."""
    ps = list(ps)
    if not ps:
        return float("nan"), float("nan")
    return float(np.mean(ps)), math.sqrt(sum(se(p, n) ** 2 for p, n in zip(ps, ns))) / len(ps)


def f4(x: Optional[float]) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def pm(m: float, s: float) -> str:
    return f"{m:.4f} ± {s:.4f}"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _variant_label(row: dict, upper_default: float) -> str:
    if row["method"] != "nps":
        return METHOD_LABELS.get(row["method"], row["method"])
    v = row["variant"]
    if v == "focused":
        return f"NPS focused (upper {upper_default:g})"
    if v == "uniform":
        return f"NPS uniform (upper {upper_default:g})"
    return f"NPS {v.replace('-upper', ', upper ')}"


def _task_names(S: dict) -> List[str]:
    return [t["name"] for t in S["suite"]["tasks"] if t["name"] in S["tasks"]]


def _test_rows(S: dict, name: str) -> int:
    return int(S["tasks"][name]["finetuned"]["test_rows"])


def _grid(S: dict) -> Dict[Tuple[str, float], Dict[str, dict]]:
    """(label, r) -> {task: row}."""
    out: Dict[Tuple[str, float], Dict[str, dict]] = {}
    for name in _task_names(S):
        for row in S["tasks"][name]["pruning"]:
            out.setdefault((row["method"] if row["method"] != "nps" else "nps:" + row["variant"], row["keep"]),
                           {})[name] = row
    return out


def _defaults():
    from ..config import MergeOptions, SearchOptions
    d = {f.name: f.default for f in dataclasses.fields(SearchOptions)}
    m = {f.name: f.default for f in dataclasses.fields(MergeOptions)}
    from ..config import PARAM_DEFAULTS
    lower, upper, sigma0 = PARAM_DEFAULTS[d["param"]]
    # "upper" is judged for the linear parametrisation (the ablation's subject)
    return {"scheme": d["scheme"], "upper": PARAM_DEFAULTS["linear"][1], "sigma0": sigma0,
            "generations": d["generations"], "normalize": m["normalize"], "lower": lower, "bands": d["bands"],
            "param": d["param"]}


# ------------------------------------------------------------------ figures
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _finish(fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> None:
    """Labels, grid and legend shared by every figure; written at 110 dpi and closed."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)


def fig_pruning(sname: str, S: dict, cfg: dict, path: Path) -> None:
    plt = _plt()
    grid = _grid(S)
    names = _task_names(S)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    series = [("magnitude", "magnitude (= TIES-trim)", "o-"), ("dare", "DARE", "s-"), ("random", "random", "x:"),
              ("nps:focused", f"NPS focused", "D-"), ("nps:uniform", "NPS uniform", "^--"),
              (f"nps:focused-upper{cfg['ablation_upper']:g}", f"NPS focused, upper {cfg['ablation_upper']:g}", "v--"),
              ("nps:focused-log", "NPS focused, log2 search", "P--")]
    for key, label, style in series:
        pts = sorted((r, float(np.mean([by[n]["test"] for n in names])))
                     for (k, r), by in grid.items() if k == key and all(n in by for n in names))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label, ms=5)
    ft = float(np.mean([S["tasks"][n]["finetuned"]["test"] for n in names]))
    ax.axhline(ft, color="k", ls="--", lw=1, label=f"fine-tuned ({ft:.3f})")
    ax.set_xscale("log")
    ks = sorted({r for (_, r) in grid})
    ax.set_xticks(ks)
    ax.set_xticklabels([f"{k:g}" for k in ks])
    from matplotlib.ticker import NullFormatter
    ax.xaxis.set_minor_formatter(NullFormatter())
    _finish(fig, ax, path, "keep ratio r (fraction of task-vector entries kept)",
            f"mean test accuracy over {len(names)} tasks",
            f"Pruning the task vector ({sname} suite)")


def fig_compression(sname: str, comp: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    markers = "os^Dv*"
    for i, row in enumerate(comp["rows"]):
        ax.scatter(row["mb"], row["normalized_mean"], marker=markers[i % len(markers)], s=60, label=row["method"],
                   zorder=3, alpha=0.85)
        ax.annotate(f"{row['mb']:.1f} MB", (row["mb"], row["normalized_mean"]), textcoords="offset points",
                    xytext=(5, 5 + 9 * (i % 2)), fontsize=7)
    mbs = [r["mb"] for r in comp["rows"]]
    log_x = max(mbs) / max(min(mbs), 1e-9) > 8
    if log_x:
        ax.set_xscale("log")
        from matplotlib.ticker import FuncFormatter
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    _finish(fig, ax, path, "storage of all tasks (MB" + (", log scale)" if log_x else ")"),
            "mean normalized accuracy (acc / fine-tuned acc)",
            f"Compression: accuracy vs storage ({sname} suite)")


def _curve_row(S: dict, name: str, keep: float) -> Optional[dict]:
    for row in S["tasks"][name]["pruning"]:
        if row["method"] == "nps" and row["variant"] == "focused" and abs(row["keep"] - keep) < 1e-12:
            return row
    return None


def fig_search(sname: str, S: dict, keep: float, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name in _task_names(S):
        row = _curve_row(S, name, keep)
        if row is None:
            continue
        y = np.asarray(row["best_so_far"]) - row["best_so_far"][0]
        ax.plot(range(len(y)), y, "o-", ms=4, label=f"{name} (w=1: {row['best_so_far'][0]:.3f})")
    ax.axhline(0, color="k", lw=0.8)
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _finish(fig, ax, path, "generation (0 = w = 1, plain magnitude top-k)",
            "best calibration accuracy so far − magnitude's",
            f"NPS search, focused bands, r = {keep:g} ({sname} suite)")


# ------------------------------------------------------------------ sections
def _settings(meta: dict) -> str:
    cfg = meta.get("config", {})
    lines = ["```"]
    lines += [f"{k} = {v}" for k, v in cfg.items()]
    lines.append("```")
    return "\n".join(lines)


def _suite_table(S: dict) -> str:
    rows = []
    for t in S["suite"]["tasks"]:
        if t["name"] not in S["tasks"]:
            continue
        ft = S["tasks"][t["name"]]["finetuned"]
        n_full = t["sizes"].get("test", 0)
        rows.append([t["name"], t["num_classes"], t["sizes"].get("train", ""), t["sizes"].get("calib", ""),
                     n_full, ft["test_rows"], ft["calib_rows"],
                     f"{t['finetuned_acc']:.4f} ± {se(t['finetuned_acc'], n_full):.4f}",
                     f"{t['pretrained_acc']:.4f}", f"{t['head_only_acc']:.4f}", f"{t['majority_acc']:.4f}",
                     f"{ft['test']:.4f} ± {se(ft['test'], ft['test_rows']):.4f}"])
    return table(["task", "classes", "train", "calib split", "test split", "test rows used", "calib rows used",
                  "fine-tuned (full test)", "pre-trained (untrained head)", "pre-trained body + ft head",
                  "majority", "fine-tuned (rows used)"], rows)


def _pruning_section(sname: str, S: dict, cfg: dict, fig_rel: Optional[str]) -> str:
    grid = _grid(S)
    names = _task_names(S)
    ns = [_test_rows(S, n) for n in names]
    keeps = sorted({r for (_, r) in grid})
    order = ["magnitude", "dare", "random", "nps:focused", "nps:uniform", f"nps:focused-upper{cfg['ablation_upper']:g}",
             "nps:focused-log"]
    labels = {"magnitude": "magnitude", "dare": "DARE", "random": "random",
              "nps:focused": f"NPS focused (upper {cfg['upper']:g})", "nps:uniform": f"NPS uniform (upper {cfg['upper']:g})",
              f"nps:focused-upper{cfg['ablation_upper']:g}": f"NPS focused, upper {cfg['ablation_upper']:g}",
              "nps:focused-log": (f"NPS focused, log2 search in [{cfg.get('log_lower', 0.25):g}, "
                                  f"{cfg.get('log_upper', 8.0):g}], σ0 {cfg.get('log_sigma0', 1.0):g}")}
    out = [f"Mean test accuracy over the {len(names)} tasks ± standard error; fine-tuned: "
           f"{pm(*mean_se([S['tasks'][n]['finetuned']['test'] for n in names], ns))}. "
           "TIES-trim on one task vector *is* magnitude top-k (no rescale; TIES' sign election only acts "
           "when merging), so its row is the magnitude numbers — checked here: "
           + ("the two pruned vectors were bit-identical at every r and task."
              if all(row.get("ties_trim_identical", True) for n in names for row in S["tasks"][n]["pruning"]
                     if row["method"] == "magnitude") else "**they differed somewhere — see the results JSON**."),
           ""]
    rows = []
    for key in order:
        cells = []
        have = False
        for r in keeps:
            by = grid.get((key, r), {})
            if all(n in by for n in names) and names:
                cells.append(pm(*mean_se([by[n]["test"] for n in names], ns)))
                have = True
            else:
                cells.append("")
        if have:
            rows.append([labels[key]] + cells)
            if key == "magnitude":
                rows.append(["TIES-trim (= magnitude)"] + cells)
    out.append(table(["method"] + [f"r = {r:g}" for r in keeps], rows))
    if fig_rel:
        out += ["", f"![pruning curves, {sname}]({fig_rel}/pruning_{sname}.png)"]
    # calibration means of the NPS variants (what the defaults are chosen on)
    crow = []
    for key in order:
        cells, have = [], False
        for r in keeps:
            by = grid.get((key, r), {})
            vals = [by[n].get("calib") for n in names if n in by]
            if key == "magnitude":
                nb = grid.get(("nps:focused", r), {})
                vals = [nb[n].get("calib_magnitude") for n in names if n in nb]
            if vals and len(vals) == len(names) and None not in vals:
                cells.append(f"{np.mean(vals):.4f}")
                have = True
            else:
                cells.append("")
        if have:
            crow.append([labels[key] + (" (w = 1 of the search)" if key == "magnitude" else "")] + cells)
    out += ["", f"Calibration accuracy (the {S['tasks'][names[0]]['finetuned']['calib_rows']}-row search data; "
                "these choose the defaults below):", "", table(["method"] + [f"r = {r:g}" for r in keeps], crow)]
    # per task
    out += ["", "<details><summary>Per task (test accuracy; ± is the per-task standard error)</summary>", ""]
    prow = []
    for n, nr in zip(names, ns):
        for key in order:
            cells, have = [], False
            for r in keeps:
                row = grid.get((key, r), {}).get(n)
                if row:
                    cells.append(f"{row['test']:.4f}")
                    have = True
                else:
                    cells.append("")
            if have:
                prow.append([n, labels[key]] + cells)
        prow.append([n, "fine-tuned", *([f"{S['tasks'][n]['finetuned']['test']:.4f} ± "
                                         f"{se(S['tasks'][n]['finetuned']['test'], nr):.4f}"] + [""] * (len(keeps) - 1))])
    out += [table(["task", "method"] + [f"r = {r:g}" for r in keeps], prow), "", "</details>"]
    # NPS band weights found
    wrows = []
    for n in names:
        for row in S["tasks"][n]["pruning"]:
            if row["method"] == "nps":
                wrows.append([n, row["variant"], f"{row['keep']:g}", " ".join(f"{w:.2f}" for w in row["weights"]),
                              f"{row.get('calib_magnitude', float('nan')):.4f} → {row['calib']:.4f}",
                              row.get("num_candidates", ""), f"{row.get('seconds', 0):.0f}"])
    out += ["", "<details><summary>NPS searches: band weights found, calibration accuracy (w = 1 → best), "
                "candidates scored, seconds</summary>", "",
            table(["task", "bands", "r", "best band weights", "calib", "candidates", "s"], wrows), "", "</details>"]
    return "\n".join(out)


FUSION_ORDER = ["pre-trained", "fine-tuned", "average", "task-arithmetic", "ties", "dare-ties"]
FUSION_LABELS = {"pre-trained": "pre-trained (τ = 0, each task's head)", "fine-tuned": "fine-tuned (one model per task)",
                 "average": "weight averaging", "task-arithmetic": "task arithmetic", "ties": "TIES",
                 "dare-ties": "DARE-TIES"}


def _fusion_rows(F: dict) -> List[Tuple[str, dict]]:
    out = [(FUSION_LABELS[k], F[k]) for k in FUSION_ORDER if k in F]
    out += [(k, v) for k, v in F.items() if k.startswith("NPS-merge (")]
    if "NPS-merge" in F:
        out.append((f"NPS-merge (per-task λ search, {F['NPS-merge'].get('normalize')})", F["NPS-merge"]))
    return out


def _lam(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, list):
        return ", ".join(f"{x:.2f}" for x in v)
    return f"{v:g}"


def _fusion_section(sname: str, S: dict) -> str:
    fj = S.get("fusion")
    if not fj:
        return "_not run (see errors)_"
    F = fj["fusion"]
    names = fj["tasks"]
    ns = [_test_rows(S, n) for n in names]
    rows = []
    for label, v in _fusion_rows(F):
        rows.append([label] + [f"{x:.4f}" for x in v["test"]] + [pm(*mean_se(v["test"], ns)), f"{v['calib_mean']:.4f}",
                                                                 _lam(v.get("lambda"))])
    return "\n".join([
        f"All {len(names)} tasks merged into one body (each task keeps its own head). λ chosen on the calibration "
        "rows (mean over tasks), reported on test. TIES and DARE-TIES keep 20% of each task vector; "
        f"NPS-merge merges the NPS-focused r = {S['fusion']['compression']['keep']:g} vectors of the pruning table. "
        "Under `lambda-sum` a common λ cancels (Σλτ̂ᵢ/Σλ = mean τ̂ᵢ), so its grid is one point.", "",
        table(["method"] + names + ["mean test ± se", "mean calib", "λ"], rows)])


def _compression_section(sname: str, S: dict, fig_rel: Optional[str]) -> str:
    fj = S.get("fusion")
    if not fj:
        return "_not run (see errors)_"
    C = fj["compression"]
    names = fj["tasks"]
    ns = [_test_rows(S, n) for n in names]
    rows = []
    for r in C["rows"]:
        paper = f"{8 * r['paper_formula_bytes'] / C['num_entries'] / len(names):.2f}" if "paper_formula_bytes" in r else ""
        rows.append([r["method"], pm(*mean_se(r["test"], ns)), f"{r['normalized_mean']:.4f}", f"{r['mb']:.2f}",
                     f"{r['bits_per_entry']:.3f}", r.get("paper_bits_per_entry") and f"{r['paper_bits_per_entry']:.3f}" or "",
                     " ".join(f"{x:.3f}" for x in r["normalized"])])
    out = [f"D = {C['num_entries']:,} prunable entries per task, {len(names)} tasks, NPS at r = {C['keep']:g}. "
           "Storage is the total of all tasks: fine-tuned = N fp32 models (prunable entries + heads); "
           "task arithmetic / TIES = one merged fp32 body + every head; NPS = a real store written with "
           "`write_store` (θ_pre once + per task mask, values, head; no tokenizer files) and measured on disk. "
           "Bits per entry = the per-task mask + values per prunable entry (θ_pre and heads excluded); "
           "the paper's 32r + 1 beside it. Every NPS task was restored with `restore_task`: the fp32 restore "
           "was checked bit-identical to the pruned model (so its accuracy is the pruning table's), the fp16 "
           "restore was scored on test.", "",
           table(["method", "mean test ± se", "normalized acc", "MB", "bits / entry / task", "paper 32r+1",
                  "normalized per task (" + ", ".join(names) + ")"], rows)]
    if fig_rel:
        out += ["", f"![compression, {sname}]({fig_rel}/compression_{sname}.png)"]
    return "\n".join(out)


def _transfer_section(S: dict) -> str:
    T = S.get("transfer") or {}
    if not T:
        return ""
    cfg_rows = []
    by_method: Dict[str, List[dict]] = {}
    for tname, tr in T.items():
        for r in tr["rows"]:
            by_method.setdefault(r["method"], []).append(r)
            cfg_rows.append([tname, r["method"], _lam(r["lambda"]), f"{r['source']:.4f}", f"{r['target']:.4f}",
                             f"{r['h_score']:.4f}", f"{r['calib']['h_score']:.4f}"])
    mean_rows = [[m, f"{np.mean([r['source'] for r in rs]):.4f}", f"{np.mean([r['target'] for r in rs]):.4f}",
                  f"{np.mean([r['h_score'] for r in rs]):.4f}"] for m, rs in by_method.items()]
    first = next(iter(T.values()))["rows"][0]
    return "\n".join([
        "Source ability = the frozen encoder's mean-pooled embeddings as k-NN features (cosine, majority of "
        "k neighbours) on the *other* text tasks' data: per other task a fixed reference set and a query set "
        f"from its calibration split ({first['source_rows']} held-out query rows in all; λ is chosen on a "
        "separate query set). Target = the task's accuracy (λ chosen on the calibration rows, reported on "
        f"{first['target_rows']} test rows). DARE, magnitude and NPS (focused) prune to the transfer keep ratio "
        "in the settings; θ = θ_pre + λ·τ̂ with λ chosen by calibration H-score. Pre-trained = λ = 0 with the "
        "fine-tuned head; fine-tuned = λ = 1 with the whole τ.", "",
        table(["task", "method", "λ", "source (held-out)", "target (test)", "H-score", "H on calibration"], cfg_rows),
        "", "Mean over the transfer tasks:", "", table(["method", "source", "target", "H-score"], mean_rows)])


def _speed_section(meta: dict, scale: Optional[dict]) -> str:
    sp = meta.get("speed")
    out = []
    if sp and "table" in sp:
        out += ["Per-candidate cost of the fast exact mask (`benchmarks/bench_candidate.py`, one subprocess "
                "per size, measured at the end of this run, after the experiments):", "", sp["table"]]
    elif sp and "error" in sp:
        out.append(f"bench_candidate failed: {sp['error']}")
    else:
        out.append("bench_candidate was not run.")
    if scale:
        when = f", written {scale['written']}" if scale.get("written") else ""
        out += ["", "At scale (`benchmarks/results/scale.json`, from `benchmarks/bench_scale.py`, which `make bench` "
                    f"runs just before the experiments, in its own processes{when}):", "", _scale_table(scale)]
    else:
        out += ["", "No `benchmarks/results/scale.json` (the 10⁹-parameter measurement) was present when this "
                    "report was rendered."]
    return "\n".join(out)


def _scale_table(scale: dict) -> str:
    rows = []
    try:
        for r in scale.get("rows", []):
            rows.append([f"{r['D']:.2e}", f"{r.get('P', 0):.2e}", f"{r.get('tau_dtype')}/{r.get('base_dtype')}",
                         r.get("threads"), f"{r['load_s']:.1f}", f"{r['bands_s']:.1f}", f"{r['build_s_median']:.2f}",
                         f"{r['floor_s_median']:.2f}", f"{r['peak_bytes'] / 2**30:.1f}",
                         f"{r['peak_x_fp32_model']:.2f}x"])
        text = table(["D (prunable)", "P (all)", "τ / θ_pre dtype", "threads", "load s", "make_bands s",
                      "build_candidate s (median)", "floor θ+τ s", "peak RSS GiB", "peak / fp32 model"], rows)
        ref = scale.get("make_bands_vs_reference")
        if ref:
            text += (f"\n\nmake_bands at D = {ref['D']:.0e}: {ref['new_s']:.3f} s vs {ref['reference_s']:.3f} s "
                     "for the reference.")
        return text
    except (KeyError, TypeError, ValueError):
        return "```\n" + _short_json(scale) + "\n```"


def _short_json(obj, limit: int = 4000) -> str:
    import json
    s = json.dumps(obj, indent=1, default=str)
    return s if len(s) <= limit else s[:limit] + "\n... (truncated; see the file)"


def _timing_section(meta: dict, suites: Dict[str, dict]) -> str:
    rows = []
    for sname, S in suites.items():
        tm = S.get("timings", {})
        rows.append([sname, f"{tm.get('suite_build_s', 0):.0f}", f"{tm.get('wall_span_s', 0) / 60:.1f}",
                     f"{tm.get('job_seconds_sum', 0) / 60:.1f}"])
    steps: Dict[Tuple[str, str], float] = {}
    for sname, S in suites.items():
        for n, tr in S.get("tasks", {}).items():
            steps[(sname, "fine-tuned scores")] = steps.get((sname, "fine-tuned scores"), 0) + tr["finetuned"].get("seconds", 0)
            for row in tr["pruning"]:
                k = "NPS searches (+ test score)" if row["method"] == "nps" else "baseline pruning (test score)"
                steps[(sname, k)] = steps.get((sname, k), 0) + row.get("seconds", 0)
        fj = S.get("fusion")
        if fj:
            for k, v in fj["fusion"].items():
                steps[(sname, "fusion")] = steps.get((sname, "fusion"), 0) + v.get("seconds", 0)
            for r in fj["compression"]["rows"]:
                if "write_s" in r:
                    steps[(sname, "compression stores (write, restore, fp16 test)")] = \
                        steps.get((sname, "compression stores (write, restore, fp16 test)"), 0) + r["write_s"] + r["restore_s"]
        for tr in (S.get("transfer") or {}).values():
            steps[(sname, "transfer")] = steps.get((sname, "transfer"), 0) + sum(r.get("seconds", 0) for r in tr["rows"])
    srows = [[s, k, f"{v / 60:.1f}"] for (s, k), v in steps.items()]
    jobs = []
    for sname, S in suites.items():
        for k, j in S.get("timings", {}).get("jobs", {}).items():
            jobs.append([sname, k, f"{j['seconds'] / 60:.1f}"])
    return "\n".join([
        f"Whole run: {meta.get('total_s', 0) / 60:.1f} min wall clock ({meta.get('config', {}).get('jobs')} worker "
        f"processes × {meta.get('config', {}).get('threads')} torch thread(s)); speed benchmark "
        f"{meta.get('speed_s', 0):.0f} s. Suite wall time = first job start to last job end (the suites' jobs "
        "share the workers, so spans overlap); job minutes = the sum over that suite's jobs. Steps restored "
        "from the result cache keep the seconds of the run that computed them.", "",
        table(["suite", "suite load/build s", "wall span (min)", "job minutes"], rows), "",
        table(["suite", "step", "minutes"], srows), "",
        "<details><summary>Per job</summary>", "", table(["suite", "job", "minutes"], jobs), "", "</details>"])


# ------------------------------------------------------------------ defaults and losses, from the numbers
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
                if row["method"] == "nps" and row["variant"] in ("focused", "uniform"):
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
    p = _paired(suites, "nps:focused", "nps:uniform", ukeeps)
    if p:
        win = "focused" if p["calib"][0] >= p["calib"][1] else "uniform"
        out.append(f"- **Band scheme** (r ∈ {{{', '.join(f'{k:g}' for k in ukeeps)}}}, {p['n']} task×r pairs): "
                   f"calibration focused {p['calib'][0]:.4f} vs uniform {p['calib'][1]:.4f}; test "
                   f"{p['test'][0]:.4f} vs {p['test'][1]:.4f}. Per suite (calib): "
                   + "; ".join(f"{s} {a:.4f} vs {b:.4f}" for s, (a, b, _) in p["per_suite"].items())
                   + "." + margin(p) + f" Choice: {win}; " + verdict("scheme", win, shipped["scheme"], p))
    up_key = f"nps:focused-upper{cfg.get('ablation_upper', 2.0):g}"
    p = _paired(suites, "nps:focused", up_key, keeps)
    if p:
        win = cfg.get("upper") if p["calib"][0] >= p["calib"][1] else cfg.get("ablation_upper")
        out.append(f"- **Upper bound of the band weights**: calibration upper {cfg.get('upper'):g} {p['calib'][0]:.4f} "
                   f"vs upper {cfg.get('ablation_upper'):g} (the paper's [0, 2]) {p['calib'][1]:.4f}; test "
                   f"{p['test'][0]:.4f} vs {p['test'][1]:.4f} ({p['n']} pairs)." + margin(p)
                   + _above_two(suites, cfg) + f" Choice: {win:g}; "
                   + verdict("upper", float(win), float(shipped["upper"]), p))
    p = _paired(suites, "nps:focused", "nps:focused-log", keeps)
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
            if k.startswith("NPS-merge (") and "single" in k:
                nm = k[len("NPS-merge ("):].split(",")[0]
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
                if row["method"] != "nps" or row["variant"] == "focused-long":
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
    key = {s: ("nps:focused" if s == float(cfg.get("sigma0", 0.3)) else f"nps:focused-sigma{s:g}") for s in sigmas}
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
            if row["method"] == "nps" and row["variant"] == "focused-long" and row.get("checkpoints"):
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
            grid_row = g.get(("nps:focused", keep), {}).get(n)
            if grid_row is not None and G in cp:
                total += 1
                same += list(cp[G]["weights"]) == list(grid_row["weights"])
    cands = {g: every[0][g].get("candidates") for g in gens}
    return {"gens": gens, "pooled": pooled, "per_suite": per_suite,
            "chosen": chosen, "chosen_per_suite": {s: choose(m) for s, m in per_suite.items()}, "n": len(every), "candidates": cands,
            "consistent": (same, total) if total else None}


def fig_generations(suites: Dict[str, dict], cfg: dict, path: Path) -> bool:
    gs = generations_study(suites, cfg)
    if not gs:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, (sname, m) in enumerate(gs["per_suite"].items()):
        c = f"C{i}"
        ax.plot(gs["gens"], [m[g][0] for g in gs["gens"]], "o-", color=c, label=f"{sname}: calibration")
        ax.plot(gs["gens"], [m[g][1] for g in gs["gens"]], "s--", color=c, label=f"{sname}: test")
    ax.axvline(gs["chosen"], color="k", lw=0.8, ls=":", label=f"chosen: {gs['chosen']} generations")
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _finish(fig, ax, path, f"CMA-ES generations ({cfg.get('popsize')} candidates each; 0 = w = 1, magnitude top-k)",
            "mean accuracy of the best-so-far candidate",
            f"NPS focused, r = {cfg.get('long_keep'):g}: what more generations buy")
    return True


def losses_section(results: dict) -> str:
    suites = results["suites"]
    items = []
    for sname, S in suites.items():
        g = _grid(S)
        names = _task_names(S)
        ns = [_test_rows(S, n) for n in names]
        for (key, r), by in sorted(g.items(), key=lambda kv: kv[0][1]):
            if key != "nps:focused" or not all(n in by for n in names):
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
                    if k.startswith("NPS-merge (") and v["test_mean"] > nps:
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


# ------------------------------------------------------------------ the document
def render(results: dict, figures_dir: Optional[Path] = None, figures_rel: str = "benchmarks/figures") -> str:
    meta = results.get("meta", {})
    suites = results.get("suites", {})
    cfg = meta.get("config", {})
    m = meta.get("machine", {})
    fig_rel = figures_rel if figures_dir is not None else None
    if figures_dir is not None:
        figures_dir = Path(figures_dir)
        figures_dir.mkdir(parents=True, exist_ok=True)
    out = ["# Benchmarks", "",
           "Generated by `make bench` (`python -m nps_pruning.bench.run`); every number below comes from the run "
           "described here. Do not edit by hand: rerun, or `python -m nps_pruning.bench.run --render-only` to "
           "re-render from `benchmarks/results/*.json`.", "",
           f"- command: `{meta.get('command', '?')}`",
           f"- date: {meta.get('date', '?')} (total {meta.get('total_s', 0) / 60:.1f} min)",
           f"- machine: {m.get('nproc')} CPUs ({m.get('cpu_model')}), {m.get('ram_gib')} GiB RAM, "
           f"{m.get('platform')}, Python {m.get('python')}, torch {m.get('torch')}, transformers "
           f"{m.get('transformers')}; load average at start {m.get('loadavg_start')} (the machine was shared)",
           f"- profile: {cfg.get('profile')}; suites: {', '.join(suites)}"]
    if meta.get("failed"):
        out.append("- **some steps failed**: " + "; ".join(e for S in suites.values() for e in S.get("errors", [])))
    out += ["", "## Settings", "",
            "`BenchConfig` of this run. "
            + (f"Text test scores use a seeded subset of {cfg.get('test_rows_text')} rows of each test split "
               f"(`make_evaluator(..., calib_size={cfg.get('test_rows_text')}, seed={cfg.get('test_seed')})` on "
               "the test file; every row where the split is smaller); "
               if cfg.get('test_rows_text') else "Text test scores use the full test splits; ")
            + "vision uses the full test splits. NPS searches score on "
            f"{cfg.get('calib_size_text')} (text) / {cfg.get('calib_size_vision')} (vision) calibration rows. "
            "± is the standard error sqrt(p(1−p)/n) (for a mean over T tasks: sqrt(Σ seᵢ²)/T).", "",
            _settings(meta)]
    cuts = []
    for what, key in (("NPS focused", "nps_keep_ratios"), ("NPS uniform", "uniform_keep_ratios")):
        if cfg.get(key) and list(cfg.get(key)) != list(cfg.get("keep_ratios")):
            cuts.append(f"{what} was searched only at r ∈ {{" + ", ".join(f"{r:g}" for r in cfg[key])
                        + "} (the baselines at every r ∈ {" + ", ".join(f"{r:g}" for r in cfg["keep_ratios"]) + "}).")
    if cfg.get("profile") == "full" and cfg.get("generations", 30) < _defaults()["generations"]:
        cuts.append(f"The grid's NPS searches run {cfg.get('generations')} CMA-ES generations of {cfg.get('popsize')} "
                    f"(the shipped default is {_defaults()['generations']} generations of the library's population) "
                    "to fit the budget; the generations study under \"Defaults chosen\" shows what more "
                    "generations add.")
    if cuts:
        out += ["", "Cut from the full grid in this run:", ""] + [f"- {c}" for c in cuts]
    for sname, S in suites.items():
        out += ["", f"## Suite: {sname}", "", f"Base: `{S['suite']['base']}`.", "", _suite_table(S)]
        if S.get("errors"):
            out += ["", "Errors: " + "; ".join(S["errors"])]
        if figures_dir is not None and S["tasks"]:
            fig_pruning(sname, S, cfg, figures_dir / f"pruning_{sname}.png")
            keep = 0.05 if any(_curve_row(S, n, 0.05) for n in _task_names(S)) else (cfg.get("nps_keep_ratios") or [0.05])[0]
            fig_search(sname, S, keep, figures_dir / f"search_{sname}.png")
            if S.get("fusion"):
                fig_compression(sname, S["fusion"]["compression"], figures_dir / f"compression_{sname}.png")
        if S["tasks"]:
            out += ["", f"### Pruning ({sname}; the paper's Fig. 4)", "", _pruning_section(sname, S, cfg, fig_rel)]
            if fig_rel:
                out += ["", f"NPS search curves ({sname}):", "", f"![search curves, {sname}]({fig_rel}/search_{sname}.png)"]
        out += ["", f"### Fusion ({sname}; Table 2)", "", _fusion_section(sname, S)]
        out += ["", f"### Compression ({sname}; Table 3 and Fig. 5)", "", _compression_section(sname, S, fig_rel)]
        tr = _transfer_section(S)
        if tr:
            out += ["", f"### Transfer ({sname}; Table 1)", "", tr]
    out += ["", "## Speed and memory", "", _speed_section(meta, results.get("scale"))]
    out += ["", "## Time taken", "", _timing_section(meta, suites)]
    gen_fig = figures_dir is not None and fig_generations(suites, cfg, figures_dir / "generations.png")
    out += ["", "## Defaults chosen", "", defaults_section(results, fig_rel if gen_fig else None)]
    out += ["", "## Where NPS does not win", "",
            "Generated from the numbers above: every comparison NPS loses on test (mean over tasks, and per task "
            "for pruning), whether or not the gap is within the standard error.", "", losses_section(results)]
    return "\n".join(out) + "\n"
