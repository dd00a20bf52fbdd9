"""Matching a fine-tuned model's tensor names to its pre-trained base, as ``transformers`` does.

A task model wraps the base model under ``base_model_prefix`` (``bert.`` for
``BertForSequenceClassification``), while a shipped base ``BertModel`` saves its tensors without
it. ``transformers``' ``from_pretrained`` loads one into the other by adding or removing that
prefix; :func:`match_names` does the same: it finds the one leading component that, stripped from
the fine-tuned names (or from the base names, the reverse case), makes them coincide. Legacy
``LayerNorm.gamma`` / ``LayerNorm.beta`` names are read as ``weight`` / ``bias`` as transformers does.
"""
from __future__ import annotations

from collections import Counter
from typing import Dict, Iterable, Optional


def _canonical(key: str) -> str:
    """transformers' legacy renames on load (``_fix_state_dict_key_on_load``)."""
    if key.endswith("LayerNorm.gamma"):
        return key[: -len("gamma")] + "weight"
    if key.endswith("LayerNorm.beta"):
        return key[: -len("beta")] + "bias"
    return key


def _head(key: str) -> Optional[str]:
    return key.split(".", 1)[0] + "." if "." in key else None


def detect_prefix(base_keys: Iterable[str], ft_keys: Iterable[str]):
    """``(prefix, side)`` where side is ``"ft"`` if the fine-tuned names carry ``prefix`` and the
    base names do not, ``"base"`` for the reverse, or ``(None, None)`` when no prefix helps."""
    base = {_canonical(k) for k in base_keys}
    ft = {_canonical(k) for k in ft_keys}
    votes: Counter = Counter()
    for k in ft - base:
        p = _head(k)
        if p is not None and k[len(p):] in base:
            votes[(p, "ft")] += 1
    for k in base - ft:
        p = _head(k)
        if p is not None and k[len(p):] in ft:
            votes[(p, "base")] += 1
    if not votes:
        return None, None
    # most matches wins; ties broken by name so the choice is deterministic
    (prefix, side), _ = min(votes.items(), key=lambda kv: (-kv[1], kv[0]))
    return prefix, side


def match_names(base_keys, ft_keys, *, prefix: Optional[str] = None,
                side: Optional[str] = None) -> Dict[str, str]:
    """Fine-tuned name -> base name for every fine-tuned tensor that has a counterpart.

    Identical names map to themselves; with a detected (or given) ``prefix``, ``prefix + name``
    on one side matches ``name`` on the other. Each base name is used at most once. The result
    follows the fine-tuned key order.
    """
    base_keys = list(base_keys)
    ft_keys = list(ft_keys)
    if prefix is None:
        prefix, side = detect_prefix(base_keys, ft_keys)
    elif side is None:
        side = "ft" if any(k.startswith(prefix) for k in ft_keys) else "base"
    base_by_canon: Dict[str, str] = {}
    for b in base_keys:
        base_by_canon.setdefault(_canonical(b), b)

    used = set()
    out: Dict[str, str] = {}

    def take(ft_name: str, canon: str) -> bool:
        b = base_by_canon.get(canon)
        if b is None or b in used:
            return False
        used.add(b)
        out[ft_name] = b
        return True

    # first the prefix-translated names (what transformers loads), then identical names
    if prefix:
        for k in ft_keys:
            c = _canonical(k)
            if side == "ft" and c.startswith(prefix):
                take(k, c[len(prefix):])
            elif side == "base":
                take(k, prefix + c)
    for k in ft_keys:
        if k not in out:
            take(k, _canonical(k))
    return {k: out[k] for k in ft_keys if k in out}
