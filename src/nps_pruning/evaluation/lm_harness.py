"""``lm-eval:TASK[,TASK...]`` — lm-evaluation-harness tasks scored on the in-memory model.

The score is the mean over the tasks of each task's primary metric (the first of ``acc``,
``exact_match``, ``acc_norm``, ``f1`` … its results report, higher is better). The harness wraps
the very model object the search rebinds in place (``HFLM(pretrained=model)``), so a candidate is
never reloaded. Offline the harness runs local tasks only: YAML files with ``dataset_path: json``
and local ``data_files``, in the folder given by ``--lm-eval-include DIR`` (or the environment
variable ``NPS_LM_EVAL_INCLUDE``); ``HF_DATASETS_OFFLINE=1`` is set while it runs.
``calib_size=N`` passes ``limit=N`` (the first N documents of each task). Needs the optional
extra: ``pip install 'nps-pruning[lm-eval]'``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional

from ..errors import NPSError
from .text import load_tokenizer

INCLUDE_ENV = "NPS_LM_EVAL_INCLUDE"
PRIMARY_METRICS = ("acc", "exact_match", "acc_norm", "f1", "mcc", "bleu", "word_perplexity")


def _import():
    try:
        import lm_eval  # noqa: F401
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise NPSError("lm-eval: evaluator needs the lm-evaluation-harness: "
                       "pip install 'nps-pruning[lm-eval]'") from None
    return simple_evaluate, HFLM, TaskManager


_MANAGERS: Dict[tuple, object] = {}


def _task_manager(TaskManager, include: Optional[str], tasks: List[str]):
    """The harness's task index for ``tasks``, built once per process and folder. With an include
    folder the folder alone is indexed first (indexing the harness's ~26k built-in task YAMLs takes
    most of a minute); the built-in tasks are added only when a task is not found there."""
    def get(key, **kw):
        if key not in _MANAGERS:
            try:
                _MANAGERS[key] = TaskManager(**kw)
            except TypeError:          # an lm-eval without include_defaults
                _MANAGERS[key] = TaskManager(include_path=kw.get("include_path"))
        return _MANAGERS[key]
    if include:
        local = get((include, False), include_path=include, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
        return get((include, True), include_path=include)
    return get((None, True))


def primary_score(task_results: Dict[str, object], task: str) -> float:
    """The task's primary metric from its results row (``"acc,none"`` and the like)."""
    for metric in PRIMARY_METRICS:
        for key, value in task_results.items():
            if key.split(",")[0] == metric and isinstance(value, (int, float)):
                # lower-is-better perplexities are reported as their negatives
                return -float(value) if metric == "word_perplexity" else float(value)
    raise NPSError(f"lm-eval:{task}: no metric the search can use in its results "
                   f"({', '.join(k for k in task_results if ',' in k)})")


class LMEvalEvaluator:
    """``lm-eval:TASKS`` (see the module docstring)."""

    fitness = "accuracy"

    def __init__(self, arg: str, *, model_path=None, calib_size: Optional[int] = None, seed: int = 0,
                 batch_size: int = 8, device="cpu", fitness: str = "accuracy", include=None, **_):
        self.tasks: List[str] = [t.strip() for t in arg.split(",") if t.strip()]
        if not self.tasks:
            raise NPSError("lm-eval: name at least one task (lm-eval:TASK[,TASK...])")
        if fitness != "accuracy":
            raise NPSError(f"lm-eval:{arg}: the harness's metrics are the score; --fitness {fitness} "
                           "does not apply")
        self.name = f"lm-eval:{arg}"
        self.path = self.name
        self.simple_evaluate, self.HFLM, TaskManager = _import()
        include = include or os.environ.get(INCLUDE_ENV)
        if include is not None and not Path(include).is_dir():
            raise NPSError(f"--lm-eval-include {include}: not a folder")
        self.include = str(Path(include).resolve()) if include else None
        self.task_manager = _task_manager(TaskManager, self.include, self.tasks)
        missing = [t for t in self.tasks if t not in self.task_manager.all_tasks]
        if missing:
            raise NPSError(f"lm-eval: unknown task(s) {', '.join(missing)}"
                           + ("" if self.include else " (local task YAMLs: --lm-eval-include DIR)"))
        self.tokenizer = load_tokenizer(model_path)
        self.limit = int(calib_size) if calib_size else None
        self.num_rows = self.limit or 0
        self.seed, self.batch_size, self.device = int(seed), int(batch_size), str(device)
        self._lm = None
        self.last_results: Optional[dict] = None

    def _wrap(self, model):
        if self._lm is None or self._lm._model is not model:
            tok = self.tokenizer
            prefix = next((t for t in (tok.bos_token_id, tok.eos_token_id, getattr(tok, "cls_token_id", None),
                                       tok.pad_token_id) if t is not None), None)
            self._lm = self.HFLM(pretrained=model, tokenizer=tok, batch_size=self.batch_size,
                                 device=self.device, prefix_token_id=prefix)
        return self._lm

    def __call__(self, model) -> float:
        lm = self._wrap(model)
        old = os.environ.get("HF_DATASETS_OFFLINE")
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        try:
            out = self.simple_evaluate(model=lm, tasks=list(self.tasks), task_manager=self.task_manager,
                                       limit=self.limit, log_samples=False, verbosity="ERROR",
                                       bootstrap_iters=0, random_seed=self.seed,
                                       numpy_random_seed=self.seed, torch_random_seed=self.seed,
                                       fewshot_random_seed=self.seed)
        except NPSError:
            raise
        except Exception as exc:  # noqa: BLE001 - the harness's own errors, one line
            raise NPSError(f"{self.name}: lm-evaluation-harness failed: {type(exc).__name__}: "
                           f"{' '.join(str(exc).split())[:300]}") from None
        finally:
            if old is None:
                os.environ.pop("HF_DATASETS_OFFLINE", None)
            else:
                os.environ["HF_DATASETS_OFFLINE"] = old
        self.last_results = out["results"]
        counts = out.get("n-samples") or {}
        self.num_rows = int(sum(int((counts.get(t) or {}).get("effective") or 0) for t in self.tasks))
        scores = [primary_score(out["results"][t], t) for t in self.tasks]
        return float(sum(scores) / len(scores))

    def score_rows(self, model, rows=None):
        raise NPSError(f"{self.name}: racing (--race) needs a classification or multiple-choice evaluator")

    def __repr__(self) -> str:
        return f"LMEvalEvaluator({self.tasks!r})"


__all__ = ["LMEvalEvaluator", "INCLUDE_ENV", "primary_score"]
