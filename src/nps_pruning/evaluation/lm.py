"""Causal language-model evaluators (SPEC §3 style; issue "Causal language models", item 2).

* ``multiple-choice:FILE`` — JSONL rows ``{"context": str, "choices": [str, ...], "label": int}``
  (the same number of choices in every row). Each choice is scored by the summed log-likelihood
  of its tokens after the context; the row's "logits" are those C sums, so every ``--fitness``
  applies: accuracy (argmax = label), loglik (log-softmax over the choices at the label) and the
  label-free agreement (KL from the fine-tuned model's distribution over the choices). When every
  choice of every row is one token, a row costs one forward pass of its context (the choices are
  read off the last position); otherwise each (row, choice) sequence is one row of a batch.
* ``perplexity:FILE`` — a ``.txt`` file (rows: its blank-line separated paragraphs) or JSONL with a
  ``text`` column; each row truncated to ``max_length`` tokens. Score: **exp(−mean token NLL)** =
  1/perplexity over all scored tokens (in (0, 1], higher is better) with the default fitness, the
  mean token log-likelihood (its log, the same ranking) with ``--fitness loglik``. Agreement is
  not defined for it.
* ``generation:FILE`` — JSONL ``prompt``, ``answer``: exact match of the greedy continuation
  (bounded length, first line, whitespace and case normalized).

The tokenizer comes from the model folder being scored; rows are tokenized once, at
construction, so a call is forward passes only, on the model whose weights the search rebinds in
place (no candidate is reloaded).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
import torch

from ..errors import NPSError
from .fitness import LOG_FLOOR, FitnessScored, check_fitness
from .lm_logits import last_logits, token_logp
from .text import JSONL_SUFFIXES, iter_jsonl, load_tokenizer, select_rows


def _jsonl_rows(path: Path, columns: Sequence[str]) -> List[dict]:
    """The objects of a JSON Lines file (:func:`.text.iter_jsonl`), each with its ``_line``."""
    if not path.is_file():
        raise NPSError(f"{path}: no such file")
    rows = [{**row, "_line": lineno} for lineno, row in iter_jsonl(path, columns)]
    if not rows:
        raise NPSError(f"{path}: empty file (no rows)")
    return rows


def read_choice_rows(path: Path, need_labels: bool = True) -> Tuple[List[str], List[List[str]], List[int]]:
    """(contexts, choices, labels) of a multiple-choice JSONL file; NPSError naming the line."""
    if path.suffix.lower() not in JSONL_SUFFIXES:
        raise NPSError(f"{path}: multiple-choice data is JSON Lines (.jsonl) with context, choices, label")
    rows = _jsonl_rows(path, ("context", "choices", "label") if need_labels else ("context", "choices"))
    contexts, choices, labels = [], [], []
    width = None
    for row in rows:
        where = f"{path}: line {row['_line']}"
        ch = row["choices"]
        if not isinstance(row["context"], str):
            raise NPSError(f"{where}: 'context' is not a string")
        if not (isinstance(ch, list) and len(ch) >= 2 and all(isinstance(c, str) and c for c in ch)):
            raise NPSError(f"{where}: 'choices' must be a list of at least two non-empty strings")
        if width is None:
            width = len(ch)
        elif len(ch) != width:
            raise NPSError(f"{where}: {len(ch)} choices, earlier rows have {width} (every row needs "
                           "the same number)")
        lab = row.get("label", 0)
        if need_labels and (isinstance(lab, bool) or not isinstance(lab, int) or not 0 <= lab < width):
            raise NPSError(f"{where}: label {lab!r} is not a choice index in 0..{width - 1}")
        contexts.append(row["context"])
        choices.append(list(ch))
        labels.append(int(lab) if isinstance(lab, int) else 0)
    return contexts, choices, labels


def read_lm_rows(path: Path) -> List[str]:
    """The rows of a perplexity file: a .txt file's paragraphs, or a JSONL file's ``text``."""
    if path.suffix.lower() in JSONL_SUFFIXES:
        rows = _jsonl_rows(path, ("text",))
        for row in rows:
            if not isinstance(row["text"], str):
                raise NPSError(f"{path}: line {row['_line']}: 'text' is not a string")
        texts = [r["text"] for r in rows if r["text"].strip()]
    else:
        if not path.is_file():
            raise NPSError(f"{path}: no such file")
        try:
            raw = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as exc:
            raise NPSError(f"{path}: not UTF-8 text ({exc.reason})") from None
        texts = [p.strip() for p in raw.replace("\r\n", "\n").split("\n\n") if p.strip()]
    if not texts:
        raise NPSError(f"{path}: no text to score")
    return texts


def _pad_right(seqs: List[List[int]], pad: int) -> Tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids, mask


def _check_vocab(model, max_id: int, source) -> None:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    rows = getattr(emb, "num_embeddings", None)
    if isinstance(rows, int) and max_id >= rows:
        raise NPSError(f"{source}: token ids go up to {max_id} but the model's input embedding has "
                       f"{rows} rows: tokenizer and model do not match")


class _LMBase:
    def _tokenize(self, model_path, tokenizer):
        # the largest logits tensor a forward pass returned ("peak_logits_bytes"), for report.json
        self.memory: dict = {}
        tok = tokenizer if tokenizer is not None else load_tokenizer(model_path)
        pad = getattr(tok, "pad_token_id", None)
        if pad is None:
            pad = getattr(tok, "eos_token_id", None)
        self.pad_id = int(pad) if pad is not None else 0
        return tok


class MultipleChoiceEvaluator(_LMBase, FitnessScored):
    """``multiple-choice:FILE`` (see the module docstring)."""

    def __init__(self, path, *, model_path=None, calib_size=None, seed=0, batch_size=16, device="cpu",
                 max_length=256, subset="all", tokenizer=None, fitness="accuracy", rest_size=None):
        self.path = Path(path)
        self.name = f"multiple-choice:{path}"
        self.fitness = check_fitness(fitness, str(path))
        if int(batch_size) <= 0:
            raise NPSError(f"{path}: batch_size must be positive, got {batch_size}")
        contexts, choices, labels = read_choice_rows(self.path, need_labels=self.fitness != "agreement")
        self.total_rows = len(contexts)
        self.indices, self.note = select_rows(len(contexts), calib_size, seed, subset, str(self.path),
                                              rest_size=rest_size)
        idx = self.indices.tolist()
        self.num_rows = len(idx)
        self.labels = torch.tensor([labels[i] for i in idx], dtype=torch.long)
        self.reference = None
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        tok = self._tokenize(model_path, tokenizer)
        L = int(max_length)
        self.ctx_ids: List[List[int]] = []
        self.choice_ids: List[List[List[int]]] = []
        for i in idx:
            ctx = tok(contexts[i])["input_ids"] or [self.pad_id]
            chs = [tok(c, add_special_tokens=False)["input_ids"] for c in choices[i]]
            if any(not c for c in chs):
                raise NPSError(f"{path}: row {i + 1}: a choice tokenizes to no tokens")
            longest = max(len(c) for c in chs)
            if longest >= L:
                raise NPSError(f"{path}: row {i + 1}: a choice is {longest} tokens, --max-length is {L}")
            ctx = ctx[-(L - longest):]          # keep the end of a long context
            self.ctx_ids.append(ctx)
            self.choice_ids.append(chs)
        self.single_token = all(len(c) == 1 for chs in self.choice_ids for c in chs)
        self.max_id = max(max(max(c) for c in chs) for chs in self.choice_ids)
        self.max_id = max(self.max_id, max(max(c) for c in self.ctx_ids))
        self.max_label = int(self.labels.max()) if self.num_rows else 0

    # row positions → batches (FitnessScored's contract)
    def _batch_positions(self) -> List[np.ndarray]:
        n = self.num_rows
        return [np.arange(s, min(n, s + self.batch_size), dtype=np.int64) for s in range(0, n, self.batch_size)]

    def _subset_positions(self, pos: np.ndarray) -> List[np.ndarray]:
        return [pos[s:s + self.batch_size] for s in range(0, len(pos), self.batch_size)]

    def _choice_scores(self, model, part: np.ndarray) -> torch.Tensor:
        """(len(part), C): summed log-likelihood of each choice of each row."""
        rows = part.tolist()
        if self.single_token:
            ids, mask = _pad_right([self.ctx_ids[i] for i in rows], self.pad_id)
            ids, mask = ids.to(self.device), mask.to(self.device)
            logp = torch.log_softmax(last_logits(model, ids, mask, self.path, self.memory), dim=-1)
            tokens = torch.tensor([[c[0] for c in self.choice_ids[i]] for i in rows], device=self.device)
            out = logp.gather(1, tokens)
            return torch.nan_to_num(out, nan=LOG_FLOOR, neginf=LOG_FLOOR).clamp_min(LOG_FLOOR)
        C = len(self.choice_ids[rows[0]])
        seqs, spans = [], []
        for i in rows:
            for c in self.choice_ids[i]:
                seqs.append(self.ctx_ids[i] + c)
                spans.append((len(self.ctx_ids[i]), len(c)))
        ids, mask = _pad_right(seqs, self.pad_id)
        lp = token_logp(model, ids.to(self.device), mask.to(self.device), self.path, self.memory)
        sums = torch.stack([lp[j, start - 1:start - 1 + n].sum() for j, (start, n) in enumerate(spans)])
        return sums.view(len(rows), C)

    def _scored(self, model, parts):
        if getattr(self, "_checked", None) is not type(model):
            _check_vocab(model, self.max_id, self.path)
            self._checked = type(model)
        with torch.inference_mode():
            for part in parts:
                yield self._choice_scores(model, part), self.labels[torch.as_tensor(part)].to(self.device)

    def _logits(self, model):
        return self._scored(model, self._batch_positions())

    def _subset_logits(self, model, parts):
        return self._scored(model, parts)

    def __repr__(self) -> str:
        return f"MultipleChoiceEvaluator({str(self.path)!r}, num_rows={self.num_rows})"


class PerplexityEvaluator(_LMBase):
    """``perplexity:FILE`` (see the module docstring)."""

    def __init__(self, path, *, model_path=None, calib_size=None, seed=0, batch_size=8, device="cpu",
                 max_length=256, subset="all", tokenizer=None, fitness="accuracy", rest_size=None):
        self.path = Path(path)
        self.name = f"perplexity:{path}"
        self.fitness = check_fitness(fitness, str(path))
        if self.fitness in ("agreement", "loglik-t"):
            raise NPSError(f"{path}: --fitness {self.fitness} is not defined for perplexity: (it scores "
                           "the text itself); use loglik or the default")
        if int(batch_size) <= 0:
            raise NPSError(f"{path}: batch_size must be positive, got {batch_size}")
        texts = read_lm_rows(self.path)
        self.total_rows = len(texts)
        self.indices, self.note = select_rows(len(texts), calib_size, seed, subset, str(self.path),
                                              rest_size=rest_size)
        self.device = torch.device(device)
        tok = self._tokenize(model_path, tokenizer)
        enc = [tok(texts[i], truncation=True, max_length=int(max_length))["input_ids"]
               for i in self.indices.tolist()]
        self.rows = [e for e in enc if len(e) >= 2]
        if not self.rows:
            raise NPSError(f"{path}: every row is shorter than two tokens: nothing to predict")
        self.num_rows = len(self.rows)
        self.num_tokens = sum(len(r) - 1 for r in self.rows)
        self.max_id = max(max(r) for r in self.rows)
        order = sorted(range(self.num_rows), key=lambda i: len(self.rows[i]))
        self.batches = [order[s:s + int(batch_size)] for s in range(0, len(order), int(batch_size))]
        self._checked = None

    def mean_loglik(self, model) -> float:
        if self._checked is not type(model):
            _check_vocab(model, self.max_id, self.path)
            self._checked = type(model)
        total = 0.0
        with torch.inference_mode():
            for part in self.batches:
                ids, mask = _pad_right([self.rows[i] for i in part], self.pad_id)
                ids, mask = ids.to(self.device), mask.to(self.device)
                lp = token_logp(model, ids, mask, self.path, self.memory)
                total += float((lp * mask[:, 1:].to(lp.dtype)).sum())
        return total / self.num_tokens

    def __call__(self, model) -> float:
        ll = self.mean_loglik(model)
        return ll if self.fitness == "loglik" else math.exp(ll)

    def score_rows(self, model, rows=None):
        raise NPSError(f"{self.path}: racing (--race) needs a classification or multiple-choice "
                       "evaluator, not perplexity:")

    def __repr__(self) -> str:
        return f"PerplexityEvaluator({str(self.path)!r}, num_rows={self.num_rows})"


def read_generation_rows(path: Path) -> Tuple[List[str], List[str]]:
    if path.suffix.lower() not in JSONL_SUFFIXES:
        raise NPSError(f"{path}: generation data is JSON Lines (.jsonl) with prompt, answer")
    rows = _jsonl_rows(path, ("prompt", "answer"))
    for row in rows:
        if not (isinstance(row["prompt"], str) and isinstance(row["answer"], str)):
            raise NPSError(f"{path}: line {row['_line']}: 'prompt' and 'answer' must be strings")
    return [r["prompt"] for r in rows], [r["answer"] for r in rows]


def normalize_answer(text: str) -> str:
    """What exact match compares: whitespace collapsed, ends stripped, case folded."""
    return " ".join(text.split()).casefold()


class GenerationEvaluator(_LMBase):
    """``generation:FILE`` — JSONL ``prompt``, ``answer``: the fraction of rows whose greedy
    continuation (at most ``max_new_tokens``, cut at the first newline) equals the answer after
    :func:`normalize_answer`. Left-padded batches; only accuracy (no loglik, agreement or race)."""

    def __init__(self, path, *, model_path=None, calib_size=None, seed=0, batch_size=8, device="cpu",
                 max_length=256, subset="all", tokenizer=None, fitness="accuracy", rest_size=None,
                 max_new_tokens: int = 16):
        self.path = Path(path)
        self.name = f"generation:{path}"
        if check_fitness(fitness, str(path)) != "accuracy":
            raise NPSError(f"{path}: generation: is scored by exact match; --fitness {fitness} does not "
                           "apply (use accuracy)")
        self.fitness = "accuracy"
        prompts, answers = read_generation_rows(self.path)
        self.total_rows = len(prompts)
        self.indices, self.note = select_rows(len(prompts), calib_size, seed, subset, str(self.path),
                                              rest_size=rest_size)
        idx = self.indices.tolist()
        self.num_rows = len(idx)
        self.device = torch.device(device)
        self.tok = self._tokenize(model_path, tokenizer)
        self.answers = [normalize_answer(answers[i]) for i in idx]
        L = int(max_length)
        self.prompts = [(self.tok(prompts[i])["input_ids"] or [self.pad_id])[-L:] for i in idx]
        self.max_id = max(max(p) for p in self.prompts)
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size = int(batch_size)
        self._checked = None

    def generate(self, model) -> List[str]:
        """The decoded greedy continuation of every row, in row order."""
        if self._checked is not type(model):
            _check_vocab(model, self.max_id, self.path)
            self._checked = type(model)
        out: List[str] = []
        with torch.inference_mode():
            for s in range(0, self.num_rows, self.batch_size):
                seqs = self.prompts[s:s + self.batch_size]
                width = max(len(q) for q in seqs)
                ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros((len(seqs), width), dtype=torch.long)
                for i, q in enumerate(seqs):           # left padding: generation continues at the end
                    ids[i, width - len(q):] = torch.tensor(q, dtype=torch.long)
                    mask[i, width - len(q):] = 1
                try:
                    gen = model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                         max_new_tokens=self.max_new_tokens, do_sample=False,
                                         pad_token_id=self.pad_id)
                except (RuntimeError, ValueError, TypeError, AttributeError) as exc:
                    raise NPSError(f"{self.path}: the model ({type(model).__name__}) cannot generate: "
                                   f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}") from None
                for row in gen[:, width:].tolist():
                    out.append(self.tok.decode(row, skip_special_tokens=True).split("\n")[0])
        return out

    def __call__(self, model) -> float:
        got = self.generate(model)
        return float(np.mean([normalize_answer(g) == a for g, a in zip(got, self.answers)]))

    def score_rows(self, model, rows=None):
        raise NPSError(f"{self.path}: racing (--race) needs a classification or multiple-choice "
                       "evaluator, not generation:")

    def __repr__(self) -> str:
        return f"GenerationEvaluator({str(self.path)!r}, num_rows={self.num_rows})"


LM_KINDS = ("multiple-choice", "perplexity", "generation")


def count_lm_rows(kind: str, path: str) -> int:
    """Rows of a multiple-choice / perplexity / generation file, without tokenizing."""
    if kind == "multiple-choice":
        return len(read_choice_rows(Path(path), need_labels=False)[0])
    if kind == "generation":
        return len(read_generation_rows(Path(path))[0])
    return len(read_lm_rows(Path(path)))


__all__ = ["MultipleChoiceEvaluator", "PerplexityEvaluator", "GenerationEvaluator", "LM_KINDS",
           "read_generation_rows", "normalize_answer", "read_choice_rows", "read_lm_rows",
           "count_lm_rows"]
