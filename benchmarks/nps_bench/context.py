"""Per-task plumbing shared by the experiments: a task as a plain dict, the task part of every
step's cache params, and :class:`TaskContext` (a task's Session and evaluators, built lazily).

Pruned NPS vectors are not stored: :meth:`TaskContext.nps_pruned` rebuilds them exactly from the
cached band weights (``make_bands`` + ``build_candidate`` are deterministic).
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict

from nps_pruning.apps.settings import PruneSettings, SearchSettings
from .config import BenchConfig


def task_dict(task) -> dict:
    """A TaskEntry as a plain dict (what workers receive)."""
    return asdict(task) if dataclasses.is_dataclass(task) else dict(task)


def stats_params(task: dict) -> dict:
    """{"running_stats": "finetuned"} for a model with BatchNorm running statistics (since they
    are kept whole by default, results differ from steps cached before), else {} (keys unchanged)."""
    from nps_pruning.checkpoints import open_checkpoint
    from nps_pruning.checkpoints.pair import is_running_stat
    if "_has_stats" not in task:
        task["_has_stats"] = any(is_running_stat(k) for k in open_checkpoint(task["finetuned"]).keys())
    return {"running_stats": "finetuned"} if task["_has_stats"] else {}


def weights_param(task: dict) -> str:
    """The SHA-256 of the task's fine-tuned tensors (in every step's key: a checkpoint that
    rebuilds differently makes exactly its own steps missing)."""
    if not task.get("weights"):
        from .suites import weights_digest
        task["weights"] = weights_digest(task["finetuned"])
    return task["weights"]


def _task_params(task: dict) -> dict:
    return {"task": task["name"], "key": task.get("key", ""), "weights": weights_param(task),
            **stats_params(task)}


class TaskContext:
    """A task's Session and evaluators, built once (lazily: a fully cached task loads nothing)."""

    def __init__(self, suite: str, task: dict, cfg: BenchConfig):
        self.suite, self.task, self.cfg = suite, task, cfg
        self._session = None
        self._calib = None
        self._test = None

    @property
    def settings(self) -> PruneSettings:
        """The grid's NPS settings at keep 0.05 (``.replace(keep_ratio=..., upper=...)`` per step)."""
        t, c = self.task, self.cfg
        search = SearchSettings(generations=c.generations, sigma0=c.sigma0, lower=c.lower,
                                upper=c.upper, popsize=c.popsize)
        return PruneSettings(keep_ratio=0.05, bands=c.bands, scheme=c.scheme, focus=c.focus,
                             search=search, seed=c.seed, calib_size=c.calib_size(self.suite),
                             batch_size=c.batch_size, max_length=t.get("max_length") or 128,
                             # this grid measures the paper's NPS (bench.wins measures the default)
                             space="magnitude", fitness="accuracy", holdout=0.0)

    @property
    def session(self):
        if self._session is None:
            from nps_pruning.apps.prune import Session
            t = self.task
            self._session = Session.load(t["base"], t["finetuned"], model_factory=t.get("model_factory"),
                                         name=t["name"])
        return self._session

    @property
    def calib(self):
        if self._calib is None:
            st = self.settings
            self._calib = self.session.evaluator(self.task["eval_calib"], calib_size=st.calib_size,
                                                 **st.evaluator_kwargs())
        return self._calib

    @property
    def test(self):
        if self._test is None:
            from nps_pruning.evaluation import make_evaluator
            self._test = make_evaluator(self.task["eval_test"], model_path=self.task["finetuned"],
                                        calib_size=self.cfg.test_rows(self.suite), seed=self.cfg.test_seed,
                                        batch_size=self.cfg.batch_size,
                                        max_length=self.task.get("max_length") or 128)
        return self._test

    def nps_pruned(self, keep: float, scheme: str, upper: float, weights) -> "torch.Tensor":
        from nps_pruning.core.prepared import prepare
        prep = prepare(self.session.task_vector.values, self.session.domain, keep=keep,
                       num_bands=self.cfg.bands, scheme=scheme, focus=self.cfg.focus, space="magnitude")
        return prep.build(weights)


def nps_step_params(ctx_or_suite, task: dict, cfg: BenchConfig, scheme: str, upper: float, keep: float) -> dict:
    suite = ctx_or_suite if isinstance(ctx_or_suite, str) else ctx_or_suite.suite
    return {**_task_params(task), **cfg.eval_params(suite), **cfg.search_params(suite),
            "scheme": scheme, "upper": upper, "keep": keep}


def _strip(d: dict) -> dict:
    return {k: v for k, v in d.items() if not k.startswith("_")}


def _find_nps(task_result: dict, variant: str, keep: float) -> dict:
    for row in task_result["pruning"]:
        if row["method"] == "nps" and row["variant"] == variant and abs(row["keep"] - keep) < 1e-12:
            return row
    raise KeyError(f"no NPS {variant} r={keep} result for {task_result['task']}")
