"""Plots of a search (as the paper's Fig. 6-7): score and band weights per generation."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from ..atomic import atomic_path


def _candidates(obj: Any) -> List[dict]:
    if hasattr(obj, "candidates"):
        return list(obj.candidates)
    if isinstance(obj, dict) and "candidates" in obj:
        return list(obj["candidates"])
    return list(obj)


def search_curves(result_or_candidates: Any) -> Dict[str, Any]:
    """Per-generation series from the candidate records (gen 0 = the w = 1 baseline)."""
    cands = _candidates(result_or_candidates)
    gens = sorted({int(c["gen"]) for c in cands})
    baseline = next((c["score"] for c in cands
                     if int(c["gen"]) == 0 and c.get("status", "ok") == "ok"), None)
    out = {"gen": [], "best": [], "mean": [], "best_so_far": [], "weights": [], "baseline": baseline}
    best_so_far = -np.inf
    for g in gens:
        ok = [c for c in cands if int(c["gen"]) == g and c.get("status", "ok") == "ok"
              and c.get("score") is not None]
        gbest = max(ok, key=lambda c: c["score"]) if ok else None
        if gbest is not None:
            best_so_far = max(best_so_far, gbest["score"])
        out["gen"].append(g)
        out["best"].append(gbest["score"] if gbest else np.nan)
        out["mean"].append(float(np.mean([c["score"] for c in ok])) if ok else np.nan)
        out["best_so_far"].append(best_so_far if np.isfinite(best_so_far) else np.nan)
        out["weights"].append(list(gbest["weights"]) if gbest else None)
    return out


def plot_search(result_or_candidates: Any, path, title: Optional[str] = None) -> Path:
    """Write a two-panel PNG: (top) best-so-far, generation best and mean score with the w = 1
    baseline dashed; (bottom) the band weights of each generation's best candidate.
    Accepts a SearchResult, a report dict with "candidates", or a list of candidate records.
    Written atomically (temporary file, then rename)."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    path = Path(path)
    cur = search_curves(result_or_candidates)
    gens = np.asarray(cur["gen"], dtype=float)
    fig = Figure(figsize=(8, 6.5), dpi=110)
    ax1, ax2 = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [1.1, 1]})

    ax1.plot(gens, cur["mean"], "o-", color="#9aa7b8", ms=3, lw=1, label="generation mean")
    ax1.plot(gens, cur["best"], "o-", color="#4a7fc1", ms=3, lw=1, label="generation best")
    ax1.plot(gens, cur["best_so_far"], "-", color="#d1495b", lw=2, label="best so far")
    if cur["baseline"] is not None:
        ax1.axhline(cur["baseline"], ls="--", color="black", lw=1,
                    label=f"w = 1 (magnitude) {cur['baseline']:.4g}")
    ax1.set_ylabel("calibration score")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8, loc="lower right")
    if title:
        ax1.set_title(title)

    rows = [(g, w) for g, w in zip(gens, cur["weights"]) if w is not None]
    if rows:
        W = np.asarray([w for _, w in rows], dtype=float)
        xs = np.asarray([g for g, _ in rows])
        m = W.shape[1]
        if m <= 10:
            colors = [matplotlib.colormaps["tab10"](b) for b in range(m)]
        else:
            colors = [matplotlib.colormaps["viridis"](b / (m - 1)) for b in range(m)]
        for b in range(m):
            ax2.plot(xs, W[:, b], "o-", ms=2.5, lw=1.2, color=colors[b],
                     label=f"band {b + 1}" + (" (largest |τ|)" if b == 0 and m > 1 else ""))
        ax2.axhline(1.0, ls=":", color="gray", lw=1)
        ax2.legend(fontsize=7, ncol=min(m, 4), loc="best")
    ax2.set_xlabel("generation (0 = baseline w = 1)")
    ax2.set_ylabel("band weight (generation best)")
    ax2.grid(alpha=0.3)
    from matplotlib.ticker import MaxNLocator
    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:                      # 0o666 less the umask, as any file
        fig.savefig(tmp, format="png")
    return path
