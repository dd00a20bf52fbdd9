"""The task pool: how a model is scored (SPEC §3 ``--eval`` contracts).

``make_evaluator(spec, ...)`` returns an :class:`Evaluator`: a callable ``model -> float`` (higher
is better) with ``.name`` and ``.num_rows``. Spec forms:

* ``text-classification:FILE`` — CSV/JSONL with ``text``,``label``; tokenizer from ``model_path``;
* ``image-classification:FILE`` — NPZ with ``images``,``labels`` (optional ``mean``,``std``);
* ``multiple-choice:FILE`` — JSONL ``context``, ``choices``, ``label``; a causal LM's summed
  log-likelihood of each choice (:mod:`.lm`);
* ``perplexity:FILE`` — text (paragraphs) or JSONL ``text``; exp(−mean token NLL) (:mod:`.lm`);
* ``generation:FILE`` — JSONL ``prompt``, ``answer``; exact match of greedy output (:mod:`.lm`);
* ``lm-eval:TASK[,TASK...]`` — lm-evaluation-harness tasks (:mod:`.lm_harness`);
* ``python:MODULE:FUNCTION`` — FUNCTION(model) -> float.

Evaluators prepare their data once, at construction (tokenize, pad, normalise), so each call
is forward passes only. ``load_model`` and ``bind_flat`` (in :mod:`.model`) give the search a
model whose weights live in one flat buffer it can overwrite per candidate.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Protocol, Tuple, runtime_checkable

import numpy as np
import torch

from ..errors import NPSError
from .image import ImageClassificationEvaluator
from .lm import GenerationEvaluator, MultipleChoiceEvaluator, PerplexityEvaluator, count_lm_rows
from .lm_harness import LMEvalEvaluator
from .model import bind_flat, load_model, load_state_dict_any, logits_of
from .python_eval import PythonEvaluator, resolve_python
from .text import TextClassificationEvaluator, read_text_rows

__all__ = [
    "Evaluator", "make_evaluator", "evaluate_path", "count_rows", "spec_kind", "eval_kind", "EvalKind", "KINDS",
    "load_model", "bind_flat", "logits_of",
    "load_state_dict_any", "resolve_python", "TextClassificationEvaluator",
    "ImageClassificationEvaluator", "PythonEvaluator", "SPEC_KINDS",
]

SPEC_KINDS = ("text-classification", "image-classification", "multiple-choice", "perplexity", "generation",
              "lm-eval", "python")


@runtime_checkable
class Evaluator(Protocol):
    name: str
    num_rows: int

    def __call__(self, model: torch.nn.Module) -> float: ...


def make_evaluator(spec: str, *, model_path=None, calib_size: Optional[int] = None, seed: int = 0,
                   batch_size: int = 64, device="cpu", max_length: int = 128,
                   subset: str = "all", fitness: str = "accuracy",
                   rest_size: Optional[int] = None) -> Evaluator:
    """Build the evaluator that ``spec`` names (see the module docstring).

    ``calib_size=N`` scores a random subsample of N rows (the same rows for the same ``seed``;
    every row when N is at least the file's length, said in the evaluator's ``.note``);
    ``subset="rest"`` scores the rows that subsample leaves out instead (the first ``rest_size``
    of them when given). ``fitness`` (:mod:`.fitness`): accuracy, loglik or agreement (label-free;
    call ``set_reference(fine-tuned model)`` first); ``python:`` evaluators score themselves.
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise NPSError(f"{spec}: expected KIND:ARGUMENT with KIND one of {', '.join(SPEC_KINDS)}")
    kind, arg = spec_kind(spec)
    if kind == "python":
        if fitness != "accuracy":
            raise NPSError(f"{spec}: --fitness {fitness} applies to the classification evaluators; "
                           "a python: evaluator returns its own score")
        return PythonEvaluator(spec)
    if not arg:
        raise NPSError(f"{spec}: missing FILE after {kind}:")
    if kind == "text-classification":
        return TextClassificationEvaluator(arg, model_path=model_path, calib_size=calib_size,
                                           seed=seed, batch_size=batch_size, device=device,
                                           max_length=max_length, subset=subset, fitness=fitness,
                                           rest_size=rest_size)
    if kind == "image-classification":
        return ImageClassificationEvaluator(arg, calib_size=calib_size, seed=seed,
                                            batch_size=batch_size, device=device, subset=subset,
                                            fitness=fitness, rest_size=rest_size)
    if kind == "lm-eval":
        return LMEvalEvaluator(arg, model_path=model_path, calib_size=calib_size, seed=seed,
                               batch_size=batch_size, device=device, fitness=fitness)
    if kind in ("multiple-choice", "perplexity", "generation"):
        cls = {"multiple-choice": MultipleChoiceEvaluator, "perplexity": PerplexityEvaluator,
               "generation": GenerationEvaluator}[kind]
        return cls(arg, model_path=model_path, calib_size=calib_size, seed=seed,
                   batch_size=batch_size, device=device, max_length=max_length, subset=subset,
                   fitness=fitness, rest_size=rest_size)
    raise NPSError(f"{spec}: unknown evaluation kind {kind!r} (expected one of {', '.join(SPEC_KINDS)})")


_ALIASES = {"text": "text-classification", "image": "image-classification"}


# the search's fitness where none is given, on the classification and multiple-choice evaluators:
# loglik at the fitted temperature (2026-12-07: above plain loglik in 13 of 16 paired text
# searches, the 4-task mean +0.003 to +0.018 at every r tried; loglik prefers timid candidates,
# e.g. a smaller magnitude rescale than the one that ranks more rows right; docs/findings.md)
DEFAULT_FITNESS = "loglik-t"


@dataclass(frozen=True)
class EvalKind:
    """What the rest of the library needs to know about an evaluator kind, declared once
    (:data:`KINDS`) instead of asked of the kind's name where it is used."""
    own_score: bool = False          # returns its own score: no fitness choice, no held-out split
    fitness: str = DEFAULT_FITNESS   # the search's fitness on it when none is given
    scores_rows: bool = True         # can score some of its rows (racing), before it is built


KINDS: Dict[str, EvalKind] = {
    "text-classification": EvalKind(), "image-classification": EvalKind(),
    "multiple-choice": EvalKind(),
    "perplexity": EvalKind(fitness="loglik"),            # no temperature: it scores the text itself
    "generation": EvalKind(fitness="accuracy"),          # exact match is its only score
    "lm-eval": EvalKind(own_score=True, fitness="accuracy"),
    "python": EvalKind(own_score=True, fitness="accuracy", scores_rows=False),
}


def eval_kind(spec) -> EvalKind:
    """The :class:`EvalKind` of an evaluator SPEC (an unknown kind: the defaults; building its
    evaluator is what refuses it)."""
    return KINDS.get(spec_kind(spec)[0], EvalKind())


def spec_kind(spec) -> Tuple[str, str]:
    """(kind, argument) of an evaluator SPEC ``KIND:ARGUMENT``: the kind lower-cased, its short
    aliases (``text``, ``image``) resolved; ("", spec) without a colon. The one place a SPEC is
    parsed (the evaluator factory, row counting, the session's fitness rules, the run identity)."""
    kind, sep, arg = str(spec).partition(":")
    if not sep:
        return "", str(spec)
    kind = kind.strip().lower()
    return _ALIASES.get(kind, kind), arg


def count_rows(spec: str) -> int:
    """How many rows the classification evaluator ``spec`` would read (no tokenizing)."""
    kind, arg = spec_kind(spec)
    if kind == "text-classification":
        return len(read_text_rows(Path(arg), need_labels=False)[0])
    if kind == "image-classification":
        try:
            with np.load(arg, allow_pickle=False) as data:
                return int(len(data["images"]))
        except Exception as exc:
            raise NPSError(f"{arg}: not a readable NPZ file with 'images' ({type(exc).__name__})") from exc
    if kind in ("multiple-choice", "perplexity", "generation"):
        return count_lm_rows(kind, arg)
    raise NPSError(f"{spec}: held-out re-scoring (--holdout) needs a text- or image-classification "
                   "evaluator; use --holdout 0 with python: evaluators")


def evaluate_path(model_path, spec: str, *, model_factory: Optional[str] = None,
                  calib_size: Optional[int] = None, seed: int = 0, batch_size: int = 64,
                  device="cpu", max_length: int = 128, subset: str = "all") -> dict:
    """Load the model at ``model_path`` and score it: ``{"score", "num_rows", "seconds", ...}``
    (``seconds`` is the scoring time; ``load_seconds`` the model and data preparation)."""
    t0 = time.perf_counter()
    model = load_model(model_path, model_factory=model_factory, device=device)
    evaluator = make_evaluator(spec, model_path=model_path, calib_size=calib_size, seed=seed,
                               batch_size=batch_size, device=device, max_length=max_length,
                               subset=subset)
    t1 = time.perf_counter()
    score = float(evaluator(model))
    t2 = time.perf_counter()
    out = {"score": score, "num_rows": int(evaluator.num_rows), "seconds": t2 - t1,
           "load_seconds": t1 - t0, "model": str(Path(model_path)), "eval": spec}
    note = getattr(evaluator, "note", "")
    if note:
        out["note"] = note
    return out
