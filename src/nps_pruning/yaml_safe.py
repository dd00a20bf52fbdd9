"""YAML for ``nps run CONFIG.yaml`` that cannot exhaust memory; :func:`read_yaml` is the one
config-file reader (size, encoding and syntax checked, each failure one NPSError line).

PyYAML's SafeLoader builds aliases as shared objects, but anything that walks the result (a
validator, an error message's repr) pays for the full expansion: ``a: &a [x, x, ...]``,
``b: &b [*a, *a, ...]``, ... is 9**9 values after nine lines. :func:`bounded_loader` measures the
expanded size of the composed document (memoised, linear in its distinct nodes) before any
Python object is built, and refuses recursive aliases.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import yaml

from .errors import NPSError, short  # short: the bounded repr of every config error message

# A config is a handful of settings: anything near these limits is not one (and an alias bomb,
# ``a: &a [x, x]``, ``b: &b [*a, *a]``, ..., expands exponentially while being built).
YAML_MAX_BYTES = 1 << 20
YAML_MAX_NODES = 100_000


def _expanded_size(root, source: str) -> int:
    """Number of nodes ``root`` stands for once every alias is expanded (memoised, so linear in
    the distinct nodes); recursive aliases are refused."""
    sizes: Dict[int, int] = {}
    busy: set = set()

    def size(node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in busy:
            raise NPSError(f"{source}: recursive YAML alias (a value that contains itself)")
        busy.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            _no_duplicate_keys(node, source)
            total += sum(size(k) + size(v) for k, v in node.value)
        busy.discard(key)
        sizes[key] = min(total, YAML_MAX_NODES + 1)
        if sizes[key] > YAML_MAX_NODES:
            raise NPSError(f"{source}: the YAML expands to more than {YAML_MAX_NODES} values "
                           "(aliases repeated too often); a config is a handful of settings")
        return sizes[key]

    try:
        return size(root)
    except RecursionError:
        raise NPSError(f"{source}: the YAML nests too deeply") from None


def _no_duplicate_keys(node, source: str) -> None:
    """PyYAML lets the last of two equal keys win silently (``pretrained:`` given twice): refuse."""
    seen = set()
    for key, _ in node.value:
        if isinstance(key, yaml.ScalarNode) and key.value != "<<":
            name = key.value.replace("-", "_")          # flag spellings: the same option
            if name in seen:
                raise NPSError(f"{source}: line {key.start_mark.line + 1}: key {key.value[:60]!r} "
                               "is given twice (YAML would keep the last silently)")
            seen.add(name)


def bounded_loader(source: str):
    """A SafeLoader class that refuses documents expanding past YAML_MAX_NODES values."""

    class BoundedLoader(yaml.SafeLoader):
        def construct_document(self, node):
            _expanded_size(node, source)
            return super().construct_document(node)

    return BoundedLoader


def read_yaml(path):
    """The document of the YAML file ``path`` (UTF-8, a BOM allowed), read with
    :func:`bounded_loader`."""

    p = Path(path)
    if not p.is_file():
        raise NPSError(f"{p}: config file not found")
    if p.stat().st_size > YAML_MAX_BYTES:
        raise NPSError(f"{p}: config file is larger than {YAML_MAX_BYTES} bytes; a config is a "
                       "handful of settings")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise NPSError(f"{p}: not UTF-8 text ({e.reason})") from None
    try:
        return yaml.load(text, Loader=bounded_loader(str(p)))   # noqa: S506 - a SafeLoader
    except yaml.YAMLError as e:
        raise NPSError(f"{p}: not valid YAML: {short(str(e).splitlines()[0] if str(e) else '')}") from None
    except RecursionError:
        raise NPSError(f"{p}: the YAML nests too deeply") from None
    except (ValueError, OverflowError) as e:    # an integer of thousands of digits, say
        raise NPSError(f"{p}: a value cannot be read ({short(str(e).splitlines()[0])})") from None
