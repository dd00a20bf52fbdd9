"""The lossless frontier (issue 35): how far down the keep ratio each method keeps the fine-tuned
accuracy, rendered from ``make bench-wins``'s results (``benchmarks/results/wins.json``) alone.

For each suite and method, the mean test accuracy over the tasks at each keep ratio r of the grid,
normalized by the fine-tuned models' mean; **r99** / **r95**: the smallest r at which it reaches
99% / 95% of the fine-tuned accuracy, interpolated linearly in log r between the two grid points
around the first crossing (reading the grid from small r up; "≤ r_min" when the smallest r already
reaches it, "> r_max" when none does). A figure per suite plots the normalized accuracy against r
on a log axis, one curve per method, like the paper's Fig. 4. **No regret**: at every r, the
default against the best of magnitude, DARE and tuned-rescale magnitude, in standard errors.

    python -m nps_bench.frontier --suites text,vision [--budget MINUTES]   # runs bench-wins on the grid
    python -m nps_bench.frontier --render-only
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .paths import repo_root

START, END = "<!-- frontier:start -->", "<!-- frontier:end -->"
FRONTIER_KEEPS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
METHODS = (("magnitude", "magnitude top-k"), ("dare", "DARE"),
           ("magnitude-rescaled", "magnitude + tuned rescale (DAREx-q style)"),
           ("della", "DELLA's MAGPRUNE (ε = 0.1)"), ("nps-paper", "NPS (paper: magnitude space, accuracy, 128 rows)"),
           ("nps-default", "**NPS (default)**"))
RIVALS = ("magnitude", "dare", "magnitude-rescaled")      # what "no regret" compares the default to


def crossing(points: Sequence[Tuple[float, float]], level: float) -> Tuple[Optional[float], str]:
    """(r, how) where the normalized accuracy first reaches ``level`` reading ``points`` ((r, value),
    any order) from small r up: the grid point itself, or the log-linear interpolation between it
    and the point before; (None, "> r_max") when no point reaches it."""
    pts = sorted((float(r), float(v)) for r, v in points)
    for i, (r, v) in enumerate(pts):
        if v >= level:
            if i == 0:
                return r, f"≤ {r:g}"
            r0, v0 = pts[i - 1]
            t = (level - v0) / (v - v0) if v != v0 else 1.0
            x = math.exp(math.log(r0) + t * (math.log(r) - math.log(r0)))
            return x, f"{x:.2g}"
    return None, f"> {pts[-1][0]:g}" if pts else "–"


def suite_curves(data: dict) -> Tuple[Optional[Tuple[float, float]], Dict[str, Dict[float, Tuple[float, float]]]]:
    """(fine-tuned (mean, se), method -> r -> (mean, se)) over the tasks that have every row."""
    from .wins import summarize
    summ = summarize(data["tasks"])
    ft = summ.get("fine-tuned", {}).get(1.0)
    full = len(data["tasks"])
    curves = {m: {k: (v[0], v[1]) for k, v in summ.get(m, {}).items() if v[2] == full and k < 1.0}
              for m, _ in METHODS}
    return (ft[0], ft[1]) if ft else None, {m: c for m, c in curves.items() if c}


def render_suite(suite: str, data: dict, figures: Optional[Path]) -> List[str]:
    ft, curves = suite_curves(data)
    if ft is None or not curves:
        return []
    keeps = sorted({k for c in curves.values() for k in c})
    lines = [f"### {suite} ({data.get('model', suite)}, {len(data['tasks'])} tasks; fine-tuned "
             f"{ft[0]:.4f})", "",
             "| method | r99 | r95 | " + " | ".join(f"r = {k:g}" for k in keeps) + " |",
             "|---" * (len(keeps) + 3) + "|"]
    from .status import STALE_MARK, stale_note
    from .wins import _stale_cell
    stale: Dict[str, str] = {}
    for m, label in METHODS:
        if m not in curves:
            continue
        c = curves[m]
        norm = [(k, v[0] / ft[0]) for k, v in c.items()]
        r99, r95 = crossing(norm, 0.99)[1], crossing(norm, 0.95)[1]
        whys = {k: _stale_cell(suite, data, m, k) for k in c}
        for w in sorted({w for w in whys.values() if w}):
            ks = [k for k in sorted(c) if whys[k] == w]
            at = "every r" if len(ks) == len(c) else "r = " + ", ".join(f"{k:g}" for k in ks)
            stale[f"{label} at {at}"] = w
        mark = STALE_MARK if any(whys.values()) else ""
        cells = [f"{c[k][0] / ft[0]:.3f}{' ' + STALE_MARK if whys.get(k) else ''}" if k in c else ""
                 for k in keeps]
        lines.append(f"| {label} | {r99}{mark} | {r95}{mark} | " + " | ".join(cells) + " |")
    lines += ["", "Normalized mean test accuracy (mean over the tasks ÷ the fine-tuned mean); r99 / r95 "
                  "interpolated in log r between grid points (see the module docstring)."]
    lines += stale_note(stale)
    if "nps-default" in curves:
        lines += ["", "No regret (the default against the best of magnitude, DARE and tuned-rescale "
                      "magnitude at each r, in standard errors of the default's mean; the target: "
                      "≥ −1 SE everywhere):", ""]
        bad = []
        for k in keeps:
            d = curves["nps-default"].get(k)
            rivals = [(m, curves[m][k][0]) for m in RIVALS if k in curves.get(m, {})]
            if d is None or not rivals:
                continue
            m, v = max(rivals, key=lambda x: x[1])
            z = (d[0] - v) / d[1] if d[1] > 0 else 0.0
            bad += [k] if z < -1 else []
            lines.append(f"- r = {k:g}: default {d[0]:.4f} vs {m} {v:.4f}: {d[0] - v:+.4f} ({z:+.2f} SE)")
        lines += ["", "No regret: " + ("met at every r." if not bad else
                                        "NOT met at r = " + ", ".join(f"{k:g}" for k in bad) + ".")]
    if figures is not None:
        _plot(suite, ft, curves, figures / f"frontier-{suite}.png")
        lines += ["", f"![{suite}: normalized accuracy against r](benchmarks/figures/frontier-{suite}.png)"]
    return lines + [""]


def render(results: dict, figures: Optional[Path]) -> str:
    lines = [START, "## The lossless frontier: how small a slim vector keeps the fine-tuned accuracy", "",
             "From `make bench-wins` on the keep-ratio grid "
             f"{', '.join(f'{k:g}' for k in FRONTIER_KEEPS)} and 0.3 (`python -m nps_bench.frontier`; "
             "each suite's commit and settings are in the section \"NPS that wins\"). The paper's claim (its Fig. 4): "
             "NPS keeps ≥ 99% of the fine-tuned accuracy down to a smaller r than magnitude top-k "
             "and DARE.", ""]
    order = ("text", "vision", "vit", "vit-long", "llm", "llm-lora")
    shown = 0
    for suite in sorted(results.get("suites", {}), key=lambda s: order.index(s) if s in order else 9):
        data = results["suites"][suite]
        if not any(float(r.get("keep", 1)) < 0.01 for rows in data["tasks"].values() for r in rows):
            continue           # not run on the frontier grid
        part = render_suite(suite, data, figures)
        shown += bool(part)
        lines += part
    if not shown:
        lines += ["No suite has been run on the frontier grid yet.", ""]
    lines.append(END)
    return "\n".join(lines)


def _plot(suite: str, ft, curves, path: Path) -> None:
    from .report_figures import _plt, save_figure
    fig, ax = _plt().subplots(figsize=(6.4, 4.2))
    for m, label in METHODS:
        if m not in curves:
            continue
        ks = sorted(curves[m])
        ax.errorbar(ks, [curves[m][k][0] / ft[0] for k in ks], yerr=[curves[m][k][1] / ft[0] for k in ks],
                    marker="o", capsize=2, label=label.replace("**", ""), lw=2.2 if m == "nps-default" else 1.2)
    for level in (0.99, 0.95):
        ax.axhline(level, color="k", ls="--" if level == 0.99 else ":", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("keep ratio r (log)")
    ax.set_ylabel("mean test accuracy / fine-tuned")
    ax.set_title(f"{suite}: the lossless frontier (± SE)")
    ax.legend(fontsize=7, loc="lower right")
    save_figure(fig, path)


def write_section(md: Path, section: str) -> None:
    """The section between its markers (first written after the bench-wins section)."""
    from .report_common import write_marked
    write_marked(md, START, END, section, after="<!-- wins:end -->")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nps_bench.frontier", description=__doc__.splitlines()[0])
    ap.add_argument("--suites", default="text,vision")
    ap.add_argument("--budget", type=float, default=None, metavar="MINUTES")
    ap.add_argument("--render-only", action="store_true")
    ap.add_argument("--results", default=str(repo_root() / "benchmarks" / "results" / "wins.json"))
    ap.add_argument("--out", default=str(repo_root() / "BENCHMARKS.md"))
    ap.add_argument("--figures", default=str(repo_root() / "benchmarks" / "figures"))
    args = ap.parse_args(argv)
    if not args.render_only:
        from . import wins
        assert set(FRONTIER_KEEPS) <= set(wins.WinsConfig().keeps)   # bench-wins' own grid covers it
        for suite in args.suites.split(","):
            rc = wins.main(["--suites", suite, "--study-variants", "default-128", "--results",
                            args.results, "--out", args.out]
                           + (["--budget", str(args.budget)] if args.budget else []))
            if rc:
                return rc
            if wins.LAST_LEFT:      # the budget stopped it: its steps are cached, nothing rendered
                print("frontier: not rendered (steps left, listed above); run the same command "
                      "again to continue", flush=True)
                return 0
    results = json.loads(Path(args.results).read_text())
    write_section(Path(args.out), render(results, Path(args.figures)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
