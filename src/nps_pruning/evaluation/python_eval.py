"""``python:MODULE:FUNCTION`` specs: user code as evaluator or model factory (SPEC §3).

MODULE is a dotted module name importable from ``sys.path`` (the current directory included) or a
path to a ``.py`` file. The same resolver serves ``--eval python:...`` (FUNCTION(model) -> float,
higher is better) and ``--model-factory python:...`` (FUNCTION(state_dict) -> nn.Module).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import numbers
import os
import sys
from pathlib import Path
from typing import Any, Callable, Tuple

import torch

from ..errors import NPSError

PREFIX = "python:"


def parse_python_spec(spec: str) -> Tuple[str, str]:
    """``python:MODULE:FUNCTION`` -> (MODULE, FUNCTION). MODULE may itself contain ``:``
    (a Windows path); the function name is what follows the last one."""
    if not spec.startswith(PREFIX):
        raise NPSError(f"{spec}: expected python:MODULE:FUNCTION")
    rest = spec[len(PREFIX):]
    module, sep, func = rest.rpartition(":")
    if not sep or not module or not func or not func.isidentifier():
        raise NPSError(f"{spec}: expected python:MODULE:FUNCTION (MODULE a dotted name or a .py file)")
    return module, func


def _import_module(module: str, spec: str):
    looks_like_file = module.endswith(".py") or os.sep in module or "/" in module
    if looks_like_file:
        path = Path(module).expanduser().resolve()
        if not path.is_file():
            raise NPSError(f"{spec}: no such Python file {module}")
        # A stable, unique module name per file, so two files named alike do not collide and
        # the same file imported twice is the same module (cached in sys.modules).
        digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
        name = f"_nps_user_{path.stem}_{digest}"
        if name in sys.modules:
            return sys.modules[name]
        mspec = importlib.util.spec_from_file_location(name, path)
        if mspec is None or mspec.loader is None:
            raise NPSError(f"{spec}: cannot import {module}")
        mod = importlib.util.module_from_spec(mspec)
        sys.modules[name] = mod
        # let the file import its siblings
        parent = str(path.parent)
        added = parent not in sys.path
        if added:
            sys.path.insert(0, parent)
        try:
            mspec.loader.exec_module(mod)
        except Exception as exc:  # user code: report it as one line naming the spec
            sys.modules.pop(name, None)
            raise NPSError(f"{spec}: importing {module} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            if added:
                try:
                    sys.path.remove(parent)
                except ValueError:
                    pass
        return mod
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        raise NPSError(f"{spec}: cannot import module {module!r} ({exc})") from exc
    except Exception as exc:
        raise NPSError(f"{spec}: importing {module} failed: {type(exc).__name__}: {exc}") from exc


def resolve_python(spec: str) -> Callable[..., Any]:
    """The callable named by ``python:MODULE:FUNCTION``; NPSError naming the spec otherwise."""
    module, func = parse_python_spec(spec)
    mod = _import_module(module, spec)
    fn = getattr(mod, func, None)
    if fn is None:
        raise NPSError(f"{spec}: module {module} has no attribute {func!r}")
    if not callable(fn):
        raise NPSError(f"{spec}: {func!r} in {module} is not callable")
    return fn


def as_score(value: Any, spec: str) -> float:
    """Accept a real number (float, int, numpy scalar, 0-d tensor) as a score; reject the rest."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise NPSError(f"{spec}: returned a tensor of shape {tuple(value.shape)}, expected a float")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise NPSError(f"{spec}: returned {type(value).__name__}, expected a float (higher is better)")
    try:
        out = float(value)
    except OverflowError:
        raise NPSError(f"{spec}: returned a number too large for a float") from None
    if math.isnan(out):
        raise NPSError(f"{spec}: returned NaN")
    return out


class PythonEvaluator:
    """``python:MODULE:FUNCTION``: FUNCTION(model) -> float. Picklable (resolves lazily)."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.name = spec
        self._fn = resolve_python(spec)  # fail early on a bad spec
        self.num_rows = int(getattr(self._fn, "num_rows", 0) or 0)
        self.note = ""

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fn"] = None
        return state

    def __call__(self, model: torch.nn.Module) -> float:
        if self._fn is None:
            self._fn = resolve_python(self.spec)
        try:
            with torch.no_grad():
                value = self._fn(model)
        except NPSError:
            raise
        except (Exception, SystemExit) as exc:   # sys.exit() in an evaluator is not nps's exit
            raise NPSError(f"{self.spec}: raised {type(exc).__name__}: {exc}") from exc
        return as_score(value, self.spec)

    def __repr__(self) -> str:
        return f"PythonEvaluator({self.spec!r})"
