"""The one decorator factory behind every name registry of the core (pruners, mergers,
NPS-merge normalizations): a name is registered once; a second registration is an error."""
from __future__ import annotations

from typing import Callable, Dict, TypeVar

F = TypeVar("F", bound=Callable)


def registrar(table: Dict[str, Callable], kind: str, doc: str = "") -> Callable[[str], Callable[[F], F]]:
    """``register = registrar(TABLE, "pruner")``; then ``@register("name")`` adds the function to
    ``TABLE`` under ``name`` (``ValueError`` if the name is taken)."""
    def register(name: str) -> Callable[[F], F]:
        def decorate(fn: F) -> F:
            if name in table:
                raise ValueError(f"{kind} {name!r} is already registered")
            table[name] = fn
            return fn
        return decorate
    register.__doc__ = doc or f"Decorator adding a {kind} under ``name`` (names are unique)."
    return register
