"""The report's PNG figures (matplotlib, Agg): pruning curves, search curves, accuracy vs storage
and the generations study; each written at 110 dpi."""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import numpy as np

from .labels import FOCUSED, FOCUSED_LOG, UNIFORM, nps_key, upper_variant
from .report_common import _curve_row, _grid, _task_names
from .report_studies import generations_study


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: Path) -> None:
    """Every report figure's last step: laid out, written at 110 dpi (its folder made), closed."""
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _plt().close(fig)


def _finish(fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> None:
    """Labels, grid and legend shared by every figure; written at 110 dpi and closed."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    save_figure(fig, path)


def fig_pruning(sname: str, S: dict, cfg: dict, path: Path) -> None:
    plt = _plt()
    grid = _grid(S)
    names = _task_names(S)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    series = [("magnitude", "magnitude (= TIES-trim)", "o-"), ("dare", "DARE", "s-"), ("random", "random", "x:"),
              (nps_key(FOCUSED), f"NPS focused", "D-"), (nps_key(UNIFORM), "NPS uniform", "^--"),
              (nps_key(upper_variant(cfg['ablation_upper'])), f"NPS focused, upper {cfg['ablation_upper']:g}", "v--"),
              (nps_key(FOCUSED_LOG), "NPS focused, log2 search", "P--")]
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


def fig_fusion(sname: str, rows, ns, path: Path) -> None:
    """Mean test accuracy per merge method with its standard error (``rows``: (label, result))."""
    from .report_common import mean_se
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.0, 0.42 * len(rows) + 1.4))
    labels = [label for label, _ in rows]
    stats = [mean_se(v["test"], ns) for _, v in rows]
    y = np.arange(len(rows))[::-1]
    ax.barh(y, [m for m, _ in stats], xerr=[se for _, se in stats], color="#4c72b0", alpha=0.8,
            error_kw={"capsize": 3, "lw": 1}, label="mean test ± se")
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=7)
    lo = min(m - se for m, se in stats)
    ax.set_xlim(max(0.0, lo - 0.05), min(1.0, max(m + se for m, se in stats) + 0.03))
    _finish(fig, ax, path, f"mean test accuracy over {len(ns)} tasks", "",
            f"Fusion: one merged model for all tasks ({sname} suite)")


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


def fig_codings(sname: str, rows: list, path: Path) -> None:
    """Pareto plot: normalized accuracy against bits per prunable entry per task, one series per
    source (DARE / default NPS: a point per coding and keep ratio), the anchors as single points."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.8, 4.6))
    series: dict = {}
    for r in rows:
        series.setdefault(r["method"], []).append(r)
    markers = "os^Dv*P"
    for i, (method, rs) in enumerate(series.items()):
        ax.scatter([r["bits_per_entry"] for r in rs], [r["normalized_mean"] for r in rs], s=36,
                   marker=markers[i % len(markers)], label=method[:48], alpha=0.85, zorder=3)
        for r in rs:
            if r["keep"] is not None and r["keep"] < 1:
                ax.annotate(f"{r['coding']} r={r['keep']:g}", (r["bits_per_entry"], r["normalized_mean"]),
                            textcoords="offset points", xytext=(3, 3), fontsize=5.5)
    ax.axvline(0.5, color="grey", lw=0.8, ls="--")
    ax.axhline(0.99, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    _finish(fig, ax, path, "bits per prunable entry per task (log scale)", "mean normalized accuracy",
            f"Stores: accuracy vs bits per entry ({sname} suite; dashed: 0.5 bits, 0.99)")


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
