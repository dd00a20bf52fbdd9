"""``text-classification:FILE`` — accuracy of a sequence-classification model (SPEC §3).

FILE is CSV (``.csv``; ``.tsv`` is tab-separated) or JSON Lines (``.jsonl``/``.ndjson``/``.json``)
with columns ``text`` and ``label`` (integer class ids). The tokenizer comes from the model folder
being scored. Rows are tokenized once, at construction, sorted by length and cut into padded
batches then, so a call is only forward passes: the search calls it hundreds of times.
"""
from __future__ import annotations

import csv
import inspect
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import NPSError
from .fitness import FitnessScored, check_fitness
from .model import logits_of

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
SUBSETS = ("all", "rest")


# -- shared by the labelled-data evaluators (text, image) -------------------------------------
def select_rows(num_rows: int, calib_size: Optional[int], seed: int, subset: str,
                source: str, rest_size: Optional[int] = None) -> Tuple[torch.Tensor, str]:
    """Row indices to score, and a note for the user (empty when nothing is worth saying).

    ``calib_size=N`` draws N rows with ``torch.Generator().manual_seed(seed).randperm`` (the same
    rows for the same seed); N at least the file's length uses every row. ``subset="all"`` scores
    the drawn rows (every row without ``calib_size``); ``subset="rest"`` scores the rows that draw
    left out (held-out rows of the same file, e.g. a test split beside a calibration split);
    ``rest_size`` keeps only the first that many of them (in the seeded order).
    """
    if subset not in SUBSETS:
        raise NPSError(f"{source}: unknown subset {subset!r} (expected one of {', '.join(SUBSETS)})")
    everything = torch.arange(num_rows)
    if calib_size is None:
        if subset == "rest":
            raise NPSError(f"{source}: subset 'rest' needs calib_size (the rows left out of it)")
        return everything, ""
    calib_size = int(calib_size)
    if calib_size <= 0:
        raise NPSError(f"{source}: calib_size must be positive, got {calib_size}")
    if calib_size >= num_rows:
        note = (f"calib_size {calib_size} >= {num_rows} rows in {source}: using all {num_rows} rows"
                if calib_size > num_rows else "")
        if subset == "rest":
            raise NPSError(f"{source}: subset 'rest' is empty: calib_size {calib_size} takes all "
                           f"{num_rows} rows")
        return everything, note
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(num_rows, generator=gen)
    chosen = perm[:calib_size] if subset == "all" else perm[calib_size:]
    if subset == "rest" and rest_size is not None:
        chosen = chosen[:max(1, int(rest_size))]
    return torch.sort(chosen).values, ""


def check_labels(labels: Sequence[Any], source: str) -> torch.Tensor:
    """Integer class ids (ints, integral floats, or strings of ints) -> int64 tensor."""
    out = []
    for i, lab in enumerate(labels):
        value: Optional[int] = None
        if isinstance(lab, bool):
            value = None
        elif isinstance(lab, int):
            value = lab
        elif isinstance(lab, float) and lab.is_integer():
            value = int(lab)
        elif isinstance(lab, str):
            try:
                value = int(lab.strip())
            except ValueError:
                value = None
        if value is None or not 0 <= value < 2 ** 31:
            raise NPSError(f"{source}: row {i + 1}: label {str(lab)[:40]!r} is not a non-negative "
                           "integer class id (below 2**31)")
        out.append(value)
    return torch.tensor(out, dtype=torch.long)


def labels_present(labels: Sequence[Any], fitness: str, source: str) -> bool:
    """Whether a file's rows are labelled. A file is either fully labelled or — for the label-free
    ``agreement`` fitness only — fully unlabelled; one row without a label among labelled ones
    (a short CSV row, a JSON ``null``, an unterminated quote that swallowed the rest of the file)
    is an NPSError naming that row, never a silent all-zero labelling."""
    missing = [i for i, lab in enumerate(labels) if lab is None or (isinstance(lab, str)
                                                                    and not lab.strip())]
    if not missing:
        return True
    if fitness == "agreement" and len(missing) == len(labels):
        return False
    i = missing[0]
    need = ("" if len(missing) < len(labels) else f"; fitness {fitness!r} needs labels")
    raise NPSError(f"{source}: row {i + 1} has no label (a non-negative integer class id): "
                   f"{len(missing)} of {len(labels)} rows unlabelled{need}; a file is either fully "
                   "labelled or, for fitness 'agreement', fully unlabelled")


def check_num_outputs(logits: torch.Tensor, max_label: int, source: str) -> None:
    if logits.dim() < 2:
        raise NPSError(f"{source}: the model returned outputs of shape {tuple(logits.shape)}, "
                       "expected (batch, classes) logits")
    if max_label >= logits.shape[-1]:
        raise NPSError(f"{source}: label {max_label} is out of range for a model with "
                       f"{logits.shape[-1]} outputs")


def forward_or_explain(model: torch.nn.Module, source, *args, **kwargs):
    """``model(*args, **kwargs)``; a failure (inputs of a shape the model does not take, ids out
    of range, out of memory) becomes one NPSError naming the data file and the input shape."""
    try:
        return model(*args, **kwargs)
    except NPSError:
        raise
    except (RuntimeError, IndexError, ValueError, TypeError, AssertionError) as exc:
        first = args[0] if args else next(iter(kwargs.values()), None)
        shape = tuple(first.shape) if isinstance(first, torch.Tensor) else "?"
        msg = " ".join(str(exc).split())[:200]
        raise NPSError(f"{source}: the model ({type(model).__name__}) cannot score inputs of shape "
                       f"{shape}: {type(exc).__name__}: {msg}") from None


# -- reading -----------------------------------------------------------------------------------
def read_text_rows(path: Path, need_labels: bool = True) -> Tuple[List[str], List[Any]]:
    """(texts, raw labels) of a CSV/TSV/JSONL file; NPSError naming the file on any problem.
    ``need_labels=False``: the ``label`` column may be missing (labels are then None)."""
    if not path.is_file():
        raise NPSError(f"{path}: no such file")
    texts: List[str] = []
    labels: List[Any] = []
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        for lineno, row in iter_jsonl(path, ("text", "label") if need_labels else ("text",)):
            if not isinstance(row["text"], str):
                raise NPSError(f"{path}: line {lineno}: 'text' is not a string")
            texts.append(row["text"])
            labels.append(row.get("label"))
    else:
        try:
            _read_csv(path, "\t" if suffix == ".tsv" else ",", texts, labels, need_labels)
        except UnicodeDecodeError as exc:
            raise NPSError(f"{path}: not UTF-8 text ({exc.reason})") from exc
    if not texts:
        raise NPSError(f"{path}: empty file (no rows)")
    return texts, labels


def iter_jsonl(path: Path, columns: Sequence[str]):
    """(line number, object) of every non-blank line of a JSON Lines file, each an object with
    ``columns``; NPSError naming the line (or the file, when it is not UTF-8). A UTF-8 BOM is
    not part of row 1."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise NPSError(f"{path}: line {lineno}: not JSON ({exc.msg})") from exc
                except RecursionError:
                    raise NPSError(f"{path}: line {lineno}: JSON nested too deeply") from None
                if not isinstance(row, dict):
                    raise NPSError(f"{path}: line {lineno}: expected a JSON object per line")
                for col in columns:
                    if col not in row:
                        raise NPSError(f"{path}: line {lineno}: missing column {col!r}")
                yield lineno, row
    except UnicodeDecodeError as exc:
        raise NPSError(f"{path}: not UTF-8 text ({exc.reason})") from exc


def _read_csv(path: Path, delimiter: str, texts: List[str], labels: List[Any],
              need_labels: bool = True) -> None:
    """Rows of a CSV/TSV file (a UTF-8 BOM is skipped; fields of any length are read)."""
    limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)       # the default (128 KiB) refuses long texts
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            try:
                fields = [str(c).strip() for c in (reader.fieldnames or [])]
                if not fields:
                    raise NPSError(f"{path}: empty file (expected a header with columns text,label)")
                for col in ("text", "label") if need_labels else ("text",):
                    if col not in fields:
                        shown = ", ".join(c[:40] for c in fields[:10])
                        raise NPSError(f"{path}: missing column {col!r} (columns: {shown})")
                reader.fieldnames = fields
                for row in reader:
                    texts.append(row["text"] or "")
                    labels.append(row.get("label"))
            except csv.Error as exc:
                raise NPSError(f"{path}: line {reader.line_num}: not valid CSV ({exc})") from None
    finally:
        csv.field_size_limit(limit)


# Files one of which holds a tokenizer's vocabulary (fast tokenizers, WordPiece, BPE, SentencePiece).
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "sentencepiece.model")


def load_tokenizer(model_path):
    if model_path is None:
        raise NPSError("text-classification needs the model folder (model_path) to find its tokenizer")
    folder = Path(model_path)
    if folder.is_file():
        folder = folder.parent
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        # transformers would build a tokenizer of special tokens only from config.json, and every
        # row would score as [UNK]s: silently wrong. Refuse instead.
        raise NPSError(f"{folder}: no tokenizer files (one of {', '.join(TOKENIZER_FILES[:3])}, ...); "
                       "copy the tokenizer files of the pre-trained model into this folder")
    try:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:
        raise NPSError(f"{folder}: cannot load a tokenizer ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc


def _forward_keys(model: torch.nn.Module, keys: Sequence[str]) -> List[str]:
    """The batch keys the model's forward accepts (all of them when it takes **kwargs)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return list(keys)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return list(keys)
    return [k for k in keys if k in params]


class TextClassificationEvaluator(FitnessScored):
    """Accuracy (argmax of logits) — or another ``fitness`` (:mod:`.fitness`) — over the selected
    rows of a text file. ``fitness="agreement"`` needs no ``label`` column."""

    def __init__(self, path, *, model_path=None, calib_size=None, seed=0, batch_size=64,
                 device="cpu", max_length=128, subset="all", tokenizer=None,
                 fitness="accuracy", rest_size=None) -> None:
        self.path = Path(path)
        self.name = f"text-classification:{path}"
        self.fitness = check_fitness(fitness, str(path))
        if int(batch_size) <= 0:
            raise NPSError(f"{path}: batch_size must be positive, got {batch_size}")
        texts, raw_labels = read_text_rows(self.path, need_labels=self.fitness != "agreement")
        labelled = labels_present(raw_labels, self.fitness, str(self.path))
        labels = (check_labels(raw_labels, str(self.path)) if labelled
                  else torch.zeros(len(texts), dtype=torch.long))
        self.total_rows = len(texts)
        self.indices, self.note = select_rows(len(texts), calib_size, seed, subset, str(self.path),
                                              rest_size=rest_size)
        idx = self.indices.tolist()
        texts = [texts[i] for i in idx]
        self.labels = labels[self.indices]
        self.num_rows = len(idx)
        self.max_label = int(self.labels.max()) if labelled else 0
        self.reference = None
        self.device = torch.device(device)
        tok = tokenizer if tokenizer is not None else load_tokenizer(model_path)
        enc = tok(texts, truncation=True, max_length=int(max_length), padding=False)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        lengths = [len(ids) for ids in enc["input_ids"]]
        self.longest = max(lengths, default=0)
        self.max_length = int(max_length)
        self.max_token_id = max((max(ids) for ids in enc["input_ids"] if len(ids)), default=-1)
        try:
            self.vocab_size = len(tok)
        except TypeError:
            self.vocab_size = self.max_token_id + 1
        self.tokenizer_source = str(model_path) if tokenizer is None else "the given tokenizer"
        # stable sort by length: batches of like lengths pad little
        order = sorted(range(len(texts)), key=lambda i: lengths[i])
        self.batches: List[Tuple[Dict[str, torch.Tensor], torch.Tensor]] = []
        self._parts: List[List[int]] = []
        for s in range(0, len(order), int(batch_size)):
            part = order[s:s + int(batch_size)]
            feats = [{k: enc[k][i] for k in keys} for i in part]
            padded = tok.pad(feats, padding=True, return_tensors="pt")
            inputs = {k: padded[k].to(self.device) for k in keys if k in padded}
            self.batches.append((inputs, self.labels[part].to(self.device)))
            self._parts.append(part)
        self._keys: Dict[type, List[str]] = {}
        # for scoring some of the rows (score_rows): each row's tokens, and how the batches pad
        self.batch_size = int(batch_size)
        self._lengths = lengths
        self._rows_enc = [{k: list(enc[k][i]) for k in keys} for i in range(len(texts))]
        pad_id = getattr(tok, "pad_token_id", None)
        self._pad = {"input_ids": 0 if pad_id is None else int(pad_id), "attention_mask": 0,
                     "token_type_ids": int(getattr(tok, "pad_token_type_id", 0) or 0)}
        self._pad_left = getattr(tok, "padding_side", "right") == "left"

    # -- some of the rows (FitnessScored.score_rows) -------------------------------------------
    def _batch_positions(self) -> List[np.ndarray]:
        return [np.asarray(p, dtype=np.int64) for p in self._parts]

    def _subset_positions(self, pos: np.ndarray) -> List[np.ndarray]:
        order = sorted(pos.tolist(), key=lambda i: self._lengths[i])    # stable, as __init__
        return [np.asarray(order[s:s + self.batch_size], dtype=np.int64)
                for s in range(0, len(order), self.batch_size)]

    def _subset_batch(self, part: np.ndarray):
        """The padded inputs of the rows ``part`` (padded as the tokenizer pads)."""
        width = max(self._lengths[i] for i in part)
        inputs = {}
        for k, pad in self._pad.items():
            if k not in self._rows_enc[0]:
                continue
            t = torch.full((len(part), width), pad, dtype=torch.long)
            for j, i in enumerate(part.tolist()):
                row = self._rows_enc[i][k]
                if self._pad_left:
                    t[j, width - len(row):] = torch.tensor(row, dtype=torch.long)
                else:
                    t[j, :len(row)] = torch.tensor(row, dtype=torch.long)
            inputs[k] = t.to(self.device)
        return inputs, self.labels[torch.as_tensor(part)].to(self.device)

    def _subset_logits(self, model: torch.nn.Module, parts):
        self.check_model(model)
        keys = self._keys.get(type(model))
        if keys is None:
            keys = self._keys[type(model)] = _forward_keys(model, list(self.batches[0][0]))
        with torch.inference_mode():
            for part in parts:
                inputs, labels = self._subset_batch(part)
                logits = logits_of(forward_or_explain(model, self.path, **{k: inputs[k] for k in keys}))
                check_num_outputs(logits, self.max_label, str(self.path))
                yield logits, labels

    def check_model(self, model: torch.nn.Module) -> None:
        """Refuse a tokenizer that does not fit the model (ids beyond its embedding table)
        with one clear line instead of an index error deep in torch."""
        get = getattr(model, "get_input_embeddings", None)
        try:
            emb = get() if callable(get) else None
        except Exception:  # noqa: BLE001 - a model without input embeddings: nothing to check
            emb = None
        rows = getattr(emb, "num_embeddings", None)
        if isinstance(rows, int) and max(self.vocab_size, self.max_token_id + 1) > rows:
            raise NPSError(f"{self.path}: the tokenizer of {self.tokenizer_source} has "
                           f"{self.vocab_size} tokens (ids up to {max(self.vocab_size - 1, self.max_token_id)}) "
                           f"but the model's input embedding has {rows} rows: tokenizer and model "
                           "do not match")
        positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        has_table = any(name.endswith("position_embeddings") and isinstance(m, torch.nn.Embedding)
                        for name, m in model.named_modules())
        if has_table and isinstance(positions, int) and self.longest > positions:
            raise NPSError(f"{self.path}: rows are up to {self.longest} tokens long (--max-length "
                           f"{self.max_length}) but the model takes at most {positions} positions; "
                           f"pass --max-length {positions}")

    def _logits(self, model: torch.nn.Module):
        self.check_model(model)         # an attribute lookup: cheap next to the forward passes
        keys = self._keys.get(type(model))
        if keys is None:
            keys = self._keys[type(model)] = _forward_keys(model, list(self.batches[0][0]))
        with torch.inference_mode():
            for inputs, labels in self.batches:
                logits = logits_of(forward_or_explain(model, self.path, **{k: inputs[k] for k in keys}))
                check_num_outputs(logits, self.max_label, str(self.path))
                yield logits, labels

    def __repr__(self) -> str:
        return f"TextClassificationEvaluator({str(self.path)!r}, num_rows={self.num_rows})"
