"""Issues 33/34: ARCHITECTURE.md's "Contracts" list the signatures other modules call; each
top-level ``def`` there must name the real function's parameters, in order, with the same
keyword-only split (``*``), as ``inspect.signature`` reads them."""
from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _contracts():
    text = (ROOT / "ARCHITECTURE.md").read_text().split("## Contracts", 1)[1]
    module, out, lines = None, [], text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        m = re.match(r"### (\w+)", line)
        if m:
            module = m.group(1)
        elif line.startswith("## "):
            break
        elif module and line.startswith("def "):
            sig = line
            while sig.count("(") > sig.count(")") and i + 1 < len(lines):
                i += 1
                sig += " " + lines[i].strip()
            out.append((module, sig))
        i += 1
    return out


def _doc_params(sig: str):
    inner, depth, start = "", 0, sig.index("(")
    for ch in sig[start + 1:]:
        if ch == "(" or ch == "[":
            depth += 1
        elif ch == ")" or ch == "]":
            if depth == 0:
                break
            depth -= 1
        inner += ch if depth == 0 else ""
    names = []
    for part in inner.split(","):
        part = part.strip()
        if not part:
            continue
        names.append("*" if part == "*" else re.split(r"[\s:=]", part)[0])
    return names


def _real_params(fn):
    names, star = [], False
    for p in inspect.signature(fn).parameters.values():
        if p.kind is p.KEYWORD_ONLY and not star:
            names.append("*")
            star = True
        if p.kind is p.VAR_POSITIONAL:
            star = True
            names.append("*" + p.name)
            continue
        names.append(p.name)
    return names


def _resolve(module: str, name: str):
    pkg = importlib.import_module(f"nps_pruning.{module}")
    if hasattr(pkg, name):
        return getattr(pkg, name)
    for info in __import__("pkgutil").iter_modules(pkg.__path__):
        mod = importlib.import_module(f"nps_pruning.{module}.{info.name}")
        if hasattr(mod, name):
            return getattr(mod, name)
    raise AssertionError(f"ARCHITECTURE.md names nps_pruning.{module}.{name}, which does not exist")


def test_every_documented_contract_matches_the_code():
    contracts = _contracts()
    assert len(contracts) >= 15
    wrong = []
    for module, sig in contracts:
        name = re.match(r"def (\w+)", sig).group(1)
        real = _real_params(_resolve(module, name))
        if _doc_params(sig) != real:
            wrong.append(f"{module}.{name}: documented {_doc_params(sig)}, real {real}")
    assert not wrong, "\n".join(wrong)
