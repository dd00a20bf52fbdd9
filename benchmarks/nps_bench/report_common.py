"""What every part of the BENCHMARKS.md report shares: standard errors and number formats, the
markdown table, the method labels, and lookups into the results (:func:`_grid`: (variant key, r)
-> {task: row}), and the shipped defaults the numbers are judged against."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .labels import FOCUSED, UNIFORM, grid_key

METHOD_LABELS = {"magnitude": "magnitude", "dare": "DARE", "random": "random"}
FUSION_ORDER = ["pre-trained", "fine-tuned", "average", "task-arithmetic", "ties", "dare-ties", "della",
                "tsv-m", "iso-c", "tsv-m-flatten", "iso-c-flatten"]
FUSION_LABELS = {"pre-trained": "pre-trained (τ = 0, each task's head)", "fine-tuned": "fine-tuned (one model per task)",
                 "average": "weight averaging", "task-arithmetic": "task arithmetic", "ties": "TIES",
                 "dare-ties": "DARE-TIES", "della": "DELLA (MAGPRUNE + TIES' sign election)",
                 "tsv-m": "TSV-M (task singular vectors, CVPR 2025)",
                 "iso-c": "Iso-C (isotropic spectrum, ICML 2025)",
                 "tsv-m-flatten": "TSV-M, every ≥ 2-D tensor flattened to a matrix (--svd-matrices flatten)",
                 "iso-c-flatten": "Iso-C, every ≥ 2-D tensor flattened to a matrix (--svd-matrices flatten)"}


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
    if v == FOCUSED:
        return f"NPS focused (upper {upper_default:g})"
    if v == UNIFORM:
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
            out.setdefault((grid_key(row["method"], row["variant"]), row["keep"]),
                           {})[name] = row
    return out


def _defaults():
    from nps_pruning.cli.options import MergeOptions, SearchOptions
    d = {f.name: f.default for f in dataclasses.fields(SearchOptions)}
    m = {f.name: f.default for f in dataclasses.fields(MergeOptions)}
    from nps_pruning.cli.options import PARAM_DEFAULTS
    lower, upper, sigma0 = PARAM_DEFAULTS[d["param"]]
    # "upper" is judged for the linear parametrisation (the ablation's subject)
    return {"scheme": d["scheme"], "upper": PARAM_DEFAULTS["linear"][1], "sigma0": sigma0,
            "generations": d["generations"], "normalize": m["normalize"], "lower": lower, "bands": d["bands"],
            "param": d["param"]}


def _curve_row(S: dict, name: str, keep: float) -> Optional[dict]:
    for row in S["tasks"][name]["pruning"]:
        if row["method"] == "nps" and row["variant"] == FOCUSED and abs(row["keep"] - keep) < 1e-12:
            return row
    return None


def _lam(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, list):
        return ", ".join(f"{x:.2f}" for x in v)
    return f"{v:g}"


def write_marked(md, start: str, end: str, section: str, after: Optional[str] = None) -> None:
    """Put ``section`` (which begins with ``start`` and ends with ``end``) into the markdown file
    ``md``: in place of the text between the markers, else right after the ``after`` marker,
    else (no ``after``) before the file's first ``## `` heading, else at the end."""
    from pathlib import Path
    from nps_pruning.atomic import atomic_write_text
    md = Path(md)
    text = md.read_text() if md.exists() else ""
    if start in text and end in text:
        pre, rest = text.split(start, 1)
        text = pre + section + rest.split(end, 1)[1]
    elif after is not None and after in text:
        pre, post = text.split(after, 1)
        text = pre + after + "\n\n" + section + post
    elif after is None and text.find("\n## ", text.find("\n") + 1) > 0:
        i = text.find("\n## ", text.find("\n") + 1)
        text = text[:i] + "\n\n" + section + "\n" + text[i:]
    else:
        text = text + "\n\n" + section + "\n"
    atomic_write_text(md, text)
