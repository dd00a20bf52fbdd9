"""Where every registry-backed option of the CLI and YAML configs reads its names.

Each function returns one registry's names, importing its module only when called, so
:mod:`nps_pruning.config` stays cheap to import and an entry registered later (a new pruner,
say: ``@register_pruner("mine")`` in ``core/sparsify.py``, or from user code) is a valid
``--method`` at once, listed in ``--help`` and accepted in YAML, with no list to edit here.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Optional

__all__ = ["Choices", "pruners", "mergers", "normalizations", "schemes", "spaces", "fitnesses",
           "executors", "tau_dtypes", "value_dtypes", "mask_codings"]


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


def pruners() -> tuple:
    from .core.sparsify import PRUNERS
    return tuple(PRUNERS)


def mergers() -> tuple:
    from .core.merge import MERGERS
    return tuple(MERGERS)


def normalizations() -> tuple:
    from .core.merge import NORMALIZATIONS
    return tuple(NORMALIZATIONS)


def schemes() -> tuple:
    from .core.bands import SCHEMES
    return tuple(SCHEMES)


def spaces() -> tuple:
    from .core.space import SPACES
    return tuple(SPACES)


def fitnesses() -> tuple:
    from .evaluation.fitness import FITNESSES
    return tuple(FITNESSES)


def executors() -> tuple:
    from .search.executors import EXECUTORS
    return tuple(EXECUTORS)


def tau_dtypes() -> tuple:
    from .checkpoints.pair import TAU_DTYPES
    return tuple(TAU_DTYPES)


def value_dtypes() -> tuple:
    from .apps.compress import VALUE_DTYPES
    return tuple(VALUE_DTYPES)


def mask_codings() -> tuple:
    from .apps.mask_coding import MASK_CODINGS
    return tuple(MASK_CODINGS)
