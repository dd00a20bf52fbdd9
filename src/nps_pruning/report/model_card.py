"""A model card (``README.md`` with Hugging Face Hub metadata) for every model folder nps writes.

The front matter is what the Hub reads (``base_model``, ``library_name``, ``tags``); the body says
how the folder was made, from the command's report: the method, the keep ratio, the settings
that matter, calibration and test scores, and the nps version. It replaces a README.md copied
from the fine-tuned model's folder (that card describes another model).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

from .. import __version__
from ..atomic import atomic_write_text

CARD = "README.md"


def _base_model(pretrained: Optional[str]) -> Optional[str]:
    """A Hub id stays as given (``org/name``); a local path becomes its folder name."""
    if not pretrained:
        return None
    p = Path(str(pretrained))
    if not p.is_absolute() and len(p.parts) == 2 and not p.exists():
        return str(pretrained)              # org/name
    return p.name or str(pretrained)


def _yaml_str(s: str) -> str:
    return json.dumps(str(s), ensure_ascii=False)    # a JSON string is a valid YAML scalar


def _scores(title: str, scores: Optional[Dict[str, Any]]) -> Iterable[str]:
    rows = [(k, v) for k, v in (scores or {}).items() if isinstance(v, (int, float))]
    if rows:
        yield f"| {title} | score |"
        yield "|---|---|"
        for k, v in rows:
            yield f"| {k} | {v:.4f} |"
        yield ""


def model_card_text(*, kind: str, name: str, pretrained: Optional[str], method: str,
                    keep: Optional[float] = None, settings: Optional[Dict[str, Any]] = None,
                    calibration: Optional[Dict[str, Any]] = None, test: Optional[Dict[str, Any]] = None,
                    extra_tags: Iterable[str] = (), note: str = "") -> str:
    tags = ["nps-pruning", kind, *(t for t in [method, *extra_tags] if t)]
    base = _base_model(pretrained)
    front = ["---"]
    if base:
        front.append(f"base_model: {_yaml_str(base)}")
    front += ["library_name: transformers", "tags:"] + [f"- {_yaml_str(t)}" for t in dict.fromkeys(tags)]
    front.append("---")
    what = {"pruned": "a slim task vector pruned from a fine-tuned model and added back to its base",
            "merged": "one task's model of a merge of several fine-tuned models of one base",
            "transferred": "the base plus λ·τ̂ (transfer with less forgetting)",
            "restored": "a task's model rebuilt from an nps compression store"}.get(kind, kind)
    body = [f"# {name}", "", f"Written by [nps-pruning](https://pypi.org/project/nps-pruning/) "
            f"{__version__}: {what}.", ""]
    facts = [("base model", pretrained), ("method", method),
             ("keep ratio", f"{keep:g}" if isinstance(keep, (int, float)) else None)]
    for k in ("bands", "scheme", "space", "fitness", "seed", "lam", "lambdas"):
        if settings and settings.get(k) is not None:
            facts.append((k, settings[k]))
    body += [f"- {k}: {v}" for k, v in facts if v is not None]
    if note:
        body += ["", note]
    body.append("")
    body += list(_scores("calibration", calibration))
    body += list(_scores("test", test))
    body.append("Loads as usual: `AutoModel.from_pretrained(folder)`; `report.json` (when present) "
                "holds every setting and score of the run.")
    return "\n".join(front + body) + "\n"


def write_model_card(folder, **kwargs) -> Path:
    """Write ``folder/README.md`` (atomically), replacing one copied from another model."""
    path = Path(folder) / CARD
    atomic_write_text(path, model_card_text(**kwargs))
    return path
