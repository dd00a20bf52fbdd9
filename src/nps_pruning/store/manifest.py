"""Checking a store's manifest before anything is read on its word (used by
:class:`nps_pruning.store.read.Store`).

A manifest is data from a file: every field the reader uses is checked for its type and range,
every part path is confined to the store folder (:func:`nps_pruning.paths.safe_relpath`), and
side-file names may not be weight files or names nps writes itself, so a restored folder's
verified weights can never be replaced by a side file. Any failure is one NPSError line naming
the manifest and the field.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator, Tuple

from ..checkpoints.save import MARKER, is_weight_file
from ..dtypes import FLOAT_NAMES
from ..errors import NPSError
from ..paths import safe_relpath
from .mask_coding import MASK_ORDERS, spans_in_order
from .value_coding import FLOAT_CODINGS

PART_KINDS = ("mask", "values", "task_specific", "buffers")
_HEX64 = re.compile(r"[0-9a-f]{64}")
MAX_MANIFEST_BYTES = 64 * 2**20
LAYOUT_DTYPES = FLOAT_NAMES


class ManifestError(NPSError):
    pass


def _fail(where: str, what: str):
    raise ManifestError(f"{where}: {what}")


def _malformed(where: str, what: str):
    _fail(where, f"malformed manifest: {what}")


_KINDS = {str: "a string", dict: "an object", list: "a list"}     # what a message calls each type


def _want(value, kind: type, field: str, where: str):
    """``value`` when it is a ``kind`` (str, dict or list), else one line naming the field."""
    if not isinstance(value, kind):
        _malformed(where, f"{field} must be {_KINDS[kind]}, got {type(value).__name__}")
    return value


def _int(value, field: str, where: str, lo: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        _malformed(where, f"{field} must be an integer >= {lo}, got {value!r:.60}")
    return value


def _sha(value, field: str, where: str) -> str:
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        _malformed(where, f"{field} must be a sha256 hex digest")
    return value


def _require(entry: dict, keys, field: str, where: str) -> None:
    for key in keys:
        if key not in entry:
            _malformed(where, f"{field} has no {key!r}")


def check_part(store: Path, part, field: str, where: str) -> None:
    _want(part, dict, field, where)
    _require(part, ("file", "bytes", "sha256"), field, where)
    try:
        safe_relpath(store, part["file"], what=f"{field}.file")
    except NPSError as err:
        _fail(where, f"unsafe part path: {err}")
    _int(part["bytes"], f"{field}.bytes", where)
    _sha(part["sha256"], f"{field}.sha256", where)


def side_file_reserved(name: str) -> bool:
    """Names a restored folder's own files have (weights, weight indexes, nps's markers)."""
    base = name.rsplit("/", 1)[-1]
    return is_weight_file(base) or base.casefold() == MARKER


def check_side_name(store: Path, name, where: str, owner: str) -> None:
    try:
        safe_relpath(store, name, what=f"side file ({owner})")
    except NPSError as err:
        _fail(where, f"unsafe side file name: {err}")
    if side_file_reserved(name):
        _fail(where, f"side file {name!r} ({owner}) has the name of a weight file nps writes "
                     "itself; a side file may not replace the restored weights")


def _task(store: Path, entry, i: int, where: str, num: int, value_dtypes, codings) -> None:
    field = f"tasks[{i}]"
    _want(entry, dict, field, where)
    _require(entry, ("name", "kept", "keep_ratio", "value_dtype", "mask_coding", "parts",
                     "side_files", "mask_sha256"), field, where)
    name = _want(entry["name"], str, f"{field}.name", where)
    if not name or "\0" in name:
        _malformed(where, f"{field}.name must be a non-empty name")
    kept = _int(entry["kept"], f"{field}.kept", where)
    if kept > num:
        _malformed(where, f"{field}.kept = {kept} exceeds num_entries {num}")
    ratio = entry["keep_ratio"]
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
        _malformed(where, f"{field}.keep_ratio must be a number in [0, 1]")
    for key, choices in (("value_dtype", value_dtypes), ("mask_coding", codings)):
        if entry[key] not in choices:
            _malformed(where, f"{field}.{key} must be one of {', '.join(choices)}")
    _sha(entry["mask_sha256"], f"{field}.mask_sha256", where)
    if entry["value_dtype"] not in FLOAT_CODINGS:    # a quantized coding records its decoded values
        _sha(entry.get("values_sha256"), f"{field}.values_sha256", where)
    parts = _want(entry["parts"], dict, f"{field}.parts", where)
    if sorted(parts) != sorted(PART_KINDS):
        _malformed(where, f"{field}.parts must hold exactly {', '.join(PART_KINDS)}")
    for kind in PART_KINDS:
        check_part(store, parts[kind], f"{field}.parts.{kind}", where)
    if entry["mask_coding"] == "seeded":
        _seeded(entry, field, where, num)
    mask_bytes = parts["mask"]["bytes"]
    need = {"packed": (num + 7) // 8, "entropy": 4 * -(-num // 2**16)}.get(entry["mask_coding"], 8)
    if mask_bytes < need:          # also bounds what a mask may make us allocate
        _malformed(where, f"{field}.parts.mask is {mask_bytes} bytes, too small for {num} entries")
    side = _want(entry["side_files"], dict, f"{field}.side_files", where)
    for fname, part in side.items():
        check_side_name(store, fname, where, f"task {name!r}")
        check_part(store, part, f"{field}.side_files[{fname!r}]", where)
    if "task_specific_entries" in entry:
        _int(entry["task_specific_entries"], f"{field}.task_specific_entries", where)


def _seeded(entry: dict, field: str, where: str, num: int) -> None:
    """The seeded mask coding's fields: an order, and for a seeded order its seed and domain."""
    if entry.get("mask_order") not in MASK_ORDERS:
        _malformed(where, f"{field}.mask_order must be one of {', '.join(MASK_ORDERS)}")
    if entry["mask_order"] == "flat":
        return
    _int(entry.get("mask_seed"), f"{field}.mask_seed", where)
    spans = _want(entry.get("mask_domain"), list, f"{field}.mask_domain", where)
    if not (all(isinstance(s, list) and len(s) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) for x in s) for s in spans)
            and spans_in_order(spans, num)):
        _malformed(where, f"{field}.mask_domain must be ascending disjoint [start, stop] spans inside 0..{num}")


def check_manifest(store: Path, manifest: Any, where: str, *, value_dtypes, codings) -> None:
    """Raise one NPSError line when ``manifest`` is not a well-formed store manifest."""
    _want(manifest, dict, "manifest", where)
    num = _int(manifest.get("num_entries"), "num_entries", where, lo=1)
    lay = _want(manifest.get("layout"), dict, "layout", where)
    names, shapes, dtypes = (_want(lay.get(key), list, f"layout.{key}", where)
                             for key in ("names", "shapes", "dtypes"))
    if not names or not len(names) == len(shapes) == len(dtypes):
        _malformed(where, "layout names, shapes and dtypes must be non-empty lists of one length")
    total = 0
    for i, (n, shape, dtype) in enumerate(zip(names, shapes, dtypes)):
        _want(n, str, f"layout.names[{i}]", where)
        size = 1
        for d in _want(shape, list, f"layout.shapes[{i}]", where):
            size *= _int(d, f"layout.shapes[{i}]", where)
        total += size
        if dtype not in LAYOUT_DTYPES:
            _malformed(where, f"layout.dtypes[{i}] must be one of {', '.join(LAYOUT_DTYPES)}, "
                              f"got {dtype!r:.40}")
    if len(set(names)) != len(names):
        _malformed(where, "layout.names has duplicates")
    if total != num:
        _fail(where, f"layout has {total} entries, manifest says {num}")
    base_names = manifest.get("base_names", {})
    if base_names is not None and (not isinstance(base_names, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in base_names.items())):
        _malformed(where, "base_names must map strings to strings")
    pre = _want(manifest.get("pretrained"), dict, "pretrained", where)
    _sha(pre.get("sha256"), "pretrained.sha256", where)
    if not isinstance(pre.get("embedded"), bool):
        _malformed(where, "pretrained.embedded must be true or false")
    if pre.get("ref") is not None:
        _want(pre["ref"], str, "pretrained.ref", where)
    if pre.get("part") is not None:
        check_part(store, pre["part"], "pretrained.part", where)
        if pre["part"]["bytes"] < 2 * num:
            _malformed(where, f"pretrained.part is too small for {num} entries")
    elif pre["embedded"]:
        _malformed(where, "pretrained.embedded is true but there is no part")
    tasks = _want(manifest.get("tasks"), list, "tasks", where)
    if not tasks:
        _malformed(where, "no tasks")
    for i, entry in enumerate(tasks):
        _task(store, entry, i, where, num, value_dtypes, codings)
    task_names = [t["name"] for t in tasks]
    if len(set(task_names)) != len(task_names):
        _malformed(where, "task names are not unique")
    files = [part["file"] for part, _ in all_parts(manifest)]
    if "manifest.json" in files:
        _malformed(where, "two parts name the same file")
    side_parts = [p for e in tasks for p in e["side_files"].values()]
    for f in {f for f in files if files.count(f) > 1}:
        # only a side file may be shared (content-addressed, kept once), and only when every
        # reference records the same size and checksum
        refs = [p for p, _ in all_parts(manifest) if p["file"] == f]
        if (not all(any(r is s for s in side_parts) for r in refs)
                or len({(r["bytes"], r["sha256"]) for r in refs}) != 1):
            _malformed(where, "two parts name the same file")


def all_parts(manifest: dict) -> Iterator[Tuple[dict, str]]:
    pre = manifest["pretrained"]
    if pre.get("part"):
        yield pre["part"], "pre-trained model"
    for entry in manifest["tasks"]:
        for part in list(entry["parts"].values()) + list(entry["side_files"].values()):
            yield part, f"task {entry['name']!r}"
