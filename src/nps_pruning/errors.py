"""One exception type for every user-facing failure.

The CLI prints ``nps: error: <message>`` (one line, naming the file or tensor at fault) and exits
non-zero; library users catch :class:`NPSError`.
"""


class NPSError(Exception):
    """A user-facing error: bad input, corrupt file, impossible option. The message is one line."""
