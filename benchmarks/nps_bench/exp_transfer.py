"""Experiment: transfer of one task (Table 1): source ability against target accuracy, pruned
vectors scaled by a λ chosen on calibration H-score.

Source ability: text suite - k-NN on the other text tasks' data (:mod:`.transfer_eval`); LLM
suites - general prose (``pydoc_data``) as exp(−mean NLL) relative to the pre-trained model's
(:class:`RelativeSource`: the pre-trained model scores 1, so the H-score weighs both abilities alike)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

from .cache import ResultCache, _logger, _set_threads
from .config import BenchConfig
from .context import TaskContext, _find_nps, _strip, _task_params, nps_step_params
from .labels import FOCUSED


def _source_data(suite_tasks: List[dict], target: str, quick: bool) -> List[Tuple[str, list, list]]:
    """Other text tasks' calibration rows: from the suite's cached calib.csv when the suite holds
    the task, else from the data loader (the same rows)."""
    from . import data as bdata
    by_name = {t["name"]: t for t in suite_tasks}
    out = []
    for name in bdata.TEXT_TASKS:
        if name == target:
            continue
        if name in by_name:
            import csv
            with open(by_name[name]["calib"], newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
            out.append((name, [r["text"] for r in rows], [int(r["label"]) for r in rows]))
        else:
            sp = bdata.load_task(name, quick=quick).calib
            out.append((name, list(sp.x), [int(y) for y in sp.y]))
    return out


class RelativeSource:
    """An evaluator's score divided by the pre-trained model's (``reference``, computed on the
    first call with τ = 0 by the caller): the source ability of the LLM suites' transfer."""

    def __init__(self, evaluator, reference: float):
        self.evaluator, self.reference = evaluator, float(reference)
        self.num_rows = evaluator.num_rows
        self.last_raw = None
        self.last_per_source: Dict[str, float] = {}

    def __call__(self, model) -> float:
        self.last_raw = float(self.evaluator(model))
        self.last_per_source = {"pydoc exp(-NLL)": self.last_raw}
        return self.last_raw / self.reference


SELECT_ROWS_LM = 64      # pydoc rows that choose λ (at most a third); the rest of the source file is reported


def run_transfer_job(task: dict, suite_tasks: List[dict], cfg_dict: dict, cache_root: str,
                     pruning: dict, suite: str = "text") -> dict:
    import torch
    from nps_pruning.apps.transfer import choose_lambda, scores_at
    from nps_pruning.core import PRUNERS
    from nps_pruning.core.prepared import prune_in_domain
    from .transfer_eval import KnnSourceEvaluator

    cfg = BenchConfig.from_dict(cfg_dict).for_suite(suite)
    _set_threads(cfg.threads)
    cache = ResultCache(Path(cache_root))
    log = _logger(f"{suite}/{task['name']}/transfer")
    t_job = time.perf_counter()
    ctx = TaskContext(suite, task, cfg)
    if suite == "text":
        src_params = {"k": cfg.knn_k, "ref": cfg.knn_ref_rows, "select": cfg.knn_select_rows,
                      "report": cfg.knn_report_rows, "seed": cfg.seed,
                      "sources": [_task_params(t) for t in suite_tasks if t["name"] != task["name"]],
                      "quick": cfg.profile == "quick"}
    else:
        from .llm_suite import source_file
        src = source_file(Path(task["dir"]).parents[2], cfg.profile == "quick")
        n_src = sum(1 for line in open(src, encoding="utf-8") if line.strip())
        src_params = {"source": str(src), "select": min(SELECT_ROWS_LM, n_src // 3), "seed": cfg.seed,
                      "relative": True}
    params = {**_task_params(task), **cfg.eval_params(suite), **src_params}
    state: Dict[str, Any] = {}

    def sources():
        if "src" not in state and suite != "text":
            s, spec = ctx.session, f"perplexity:{src_params['source']}"
            kw = dict(calib_size=src_params["select"], seed=cfg.seed, batch_size=cfg.batch_size,
                      max_length=task.get("max_length") or 128)
            sel, rep = s.evaluator(spec, **kw), s.evaluator(spec, subset="rest", **kw)
            zero = torch.zeros_like(s.task_vector.values)
            state["src"] = (RelativeSource(sel, s.score(sel, zero)), RelativeSource(rep, s.score(rep, zero)))
        if "src" not in state:
            data = _source_data(suite_tasks, task["name"], cfg.profile == "quick")
            kw = dict(k=cfg.knn_k, ref_rows=cfg.knn_ref_rows, select_rows=cfg.knn_select_rows,
                      report_rows=cfg.knn_report_rows, seed=cfg.seed,
                      max_length=task.get("max_length") or 128, batch_size=cfg.batch_size)
            state["src"] = (KnnSourceEvaluator(data, task["finetuned"], part="select", **kw),
                            KnnSourceEvaluator(data, task["finetuned"], part="report", **kw))
        return state["src"]

    def vector(method):
        s = ctx.session
        if method == "pre-trained":
            return torch.zeros_like(s.task_vector.values)
        if method == "fine-tuned":
            return s.task_vector.values
        if method == "nps":
            row = _find_nps(pruning, FOCUSED, cfg.transfer_keep)
            return ctx.nps_pruned(cfg.transfer_keep, cfg.scheme, cfg.upper, row["weights"])
        return prune_in_domain(PRUNERS[method], s.task_vector.values, cfg.transfer_keep, s.domain, seed=cfg.seed)

    rows = []
    for method in ("pre-trained", "fine-tuned", "dare", "magnitude", "nps"):
        mp = dict(params, method=method, keep=cfg.transfer_keep, lambdas=list(cfg.transfer_lambdas))
        if method == "nps":
            mp["pruned"] = nps_step_params(suite, task, cfg, cfg.scheme, cfg.upper, cfg.transfer_keep)

        def compute(method=method):
            s = ctx.session
            sel, rep = sources()
            tau = vector(method)
            if method in ("pre-trained", "fine-tuned"):
                lam, grid = (0.0 if method == "pre-trained" else 1.0), None
                calib = scores_at(s, tau, lam, sel, ctx.calib)
            else:
                choice = choose_lambda(s, tau, sel, ctx.calib, list(cfg.transfer_lambdas))
                lam, grid = choice["best"]["lambda"], choice["grid"]
                calib = {k: choice["best"][k] for k in ("source", "target", "h_score")}
            held = scores_at(s, tau, lam, rep, ctx.test)
            return {"lambda": lam, "grid": grid, "calib": calib, "source": held["source"],
                    "target": held["target"], "h_score": held["h_score"],
                    "source_per_task": dict(rep.last_per_source), "source_rows": rep.num_rows,
                    "target_rows": ctx.test.num_rows}
        res = cache.step(suite, task["name"], f"transfer-{method}", mp, compute, log)
        rows.append({"method": method, **_strip(res)})
    return {"task": task["name"], "rows": rows, "job_s": time.perf_counter() - t_job}
