"""One exception type for every user-facing failure.

The CLI prints ``nps: error: <message>`` (one line, naming the file or tensor at fault) and exits
non-zero; library users catch :class:`NPSError`.
"""
import reprlib
from typing import Any


class NPSError(Exception):
    """A user-facing error: bad input, corrupt file, impossible option. The message is one line."""


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict = 2, 4, 4, 4
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 60, 60, 40


def short(value: Any) -> str:
    """A bounded one-line repr for error messages: never the whole of a huge (or aliased,
    or recursive) value from a config file."""
    try:
        text = _REPR.repr(value)
    except Exception:  # noqa: BLE001 - a value whose repr fails still gets a message
        text = f"<{type(value).__name__}>"
    return " ".join(text.split())[:120]
