"""Where every registry-backed option of the CLI and YAML configs reads its names.

Each function returns one registry's names, importing its module only when called, so
:mod:`nps_pruning.cli.options` stays cheap to import and an entry registered later (a new pruner,
say: ``@register_pruner("mine")`` in ``core/sparsify.py``, or from user code) is a valid
``--method`` at once, listed in ``--help`` and accepted in YAML, with no list to edit here.
"""
from __future__ import annotations

import importlib
from typing import Callable, Iterable, Iterator, Optional

__all__ = ["Choices", "pruners", "mergers", "normalizations", "schemes", "spaces", "fitnesses",
           "executors", "tau_dtypes", "value_dtypes", "mask_codings", "merge_option"]


class Choices:
    """The allowed values of an option, read from a registry each time they are used.

    ``Choices(load)`` calls ``load()`` (no arguments; it may import the registry's module) when the
    parser is built or a value is validated, so a method registered after this module was imported
    is a valid choice. ``first`` (the default, usually) is listed first; the rest keep the
    registry's order. Iterates, tests membership and joins like the tuple it stands for."""

    def __init__(self, load: Callable[[], Iterable[str]], first: Optional[str] = None):
        self._load, self._first = load, first

    def names(self) -> tuple:
        names = tuple(self._load())
        if self._first in names:
            names = (self._first,) + tuple(n for n in names if n != self._first)
        return names

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __contains__(self, value) -> bool:
        return value in self.names()

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"Choices({self.names()!r})"


def _names_of(module: str, attr: str) -> Callable[[], tuple]:
    """A loader of the names of registry ``attr`` in ``module`` (imported when first called)."""
    def load() -> tuple:
        return tuple(getattr(importlib.import_module(module, __package__), attr))
    load.__name__ = attr.lower()
    load.__doc__ = f"The names in {module.lstrip('.')}.{attr}."
    return load


pruners = _names_of(".core.sparsify", "PRUNERS")
mergers = _names_of(".core.merge", "MERGERS")
normalizations = _names_of(".core.merge", "NORMALIZATIONS")
schemes = _names_of(".core.bands", "SCHEMES")
spaces = _names_of(".core.space", "SPACES")
fitnesses = _names_of(".evaluation.fitness", "FITNESSES")
executors = _names_of(".search.executors", "EXECUTORS")
tau_dtypes = _names_of(".checkpoints.pair", "TAU_DTYPES")
value_dtypes = _names_of(".store", "VALUE_CODINGS")
mask_codings = _names_of(".store.mask_coding", "MASK_CODINGS")


def merge_option(name: str) -> Callable[[], tuple]:
    """A loader of the values of merge option ``name`` (``core.merge.MERGE_OPTIONS``)."""
    def load() -> tuple:
        return tuple(importlib.import_module(".core.merge", __package__).MERGE_OPTIONS[name])
    load.__name__ = name
    return load
