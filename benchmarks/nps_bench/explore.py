"""What the exploration scripts (``benchmarks/explore_*.py``, not benchmark steps) share: each task
of a suite loaded once, with the 1000-row test evaluator the benchmark's tables use."""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

from nps_pruning.apps.session import Session
from nps_pruning.evaluation import make_evaluator

from .context import task_dict
from .suites import build_suite


def explore_tasks(suite_name: str, tasks: Optional[str] = None) -> Iterator[Tuple[dict, int, Session, object]]:
    """(task dict, max_length, Session, test evaluator) of each task of ``suite_name``; only those
    named in ``tasks`` (comma-separated) when given."""
    for t in build_suite(suite_name).tasks:
        if tasks and t.name not in tasks.split(","):
            continue
        task = task_dict(t)
        ml = task.get("max_length") or 128
        s = Session.load(task["base"], task["finetuned"], model_factory=task.get("model_factory"),
                         name=task["name"])
        test = make_evaluator(task["eval_test"], model_path=task["finetuned"], calib_size=1000, seed=0,
                              batch_size=64, max_length=ml)
        yield task, ml, s, test
