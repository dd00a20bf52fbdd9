"""The experiments behind BENCHMARKS.md: pruning, fusion, compression, transfer (SPEC §4).

Every step's result is cached as JSON under ``<cache>/bench-results`` (``$NPS_CACHE`` or
``~/.cache/nps-pruning``), keyed by (suite, task, step, a hash of the settings the step uses and
of the fine-tuned checkpoint's build key), so a killed ``make bench`` resumes where it stopped.
Pruned NPS vectors are not stored: they are rebuilt exactly from the cached band weights
(``make_bands`` + ``build_candidate`` are deterministic).

Work is split into jobs that run in worker processes (``BenchConfig.jobs``, each with
``BenchConfig.threads`` torch threads): one pruning job per task, one fusion+compression job per
suite (after its pruning jobs), one transfer job per transfer task.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..atomic import atomic_write_text
from ..config import MergeOptions, PruneOptions
from ..search import PARAM_DEFAULTS

# The library's search bounds and step sizes (search/cmaes_search.py), which the benchmark measures
# as "the default". Their values are part of the result-cache keys (search_params), so changing a
# library default re-runs the benchmark's searches; tests/test_registry.py pins today's numbers.
_LIN_LOWER, _LIN_UPPER, _LIN_SIGMA0 = PARAM_DEFAULTS["linear"]
_LOG_LOWER, _LOG_UPPER, _LOG_SIGMA0 = PARAM_DEFAULTS["log"]

RESULTS_VERSION = 1


@dataclass
class BenchConfig:
    """Every setting of a benchmark run (printed into BENCHMARKS.md)."""

    profile: str = "full"                       # "full" | "quick" (CI smoke)
    suites: Tuple[str, ...] = ("text", "vision")
    tasks_per_suite: Optional[int] = None       # None: every task of the suite
    # pruning grid
    keep_ratios: Tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.3)
    baselines: Tuple[str, ...] = ("magnitude", "dare", "random")
    # NPS, both band schemes, at every r of the grid (the paper's Fig. 4)
    nps_keep_ratios: Tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.3)        # NPS focused
    uniform_keep_ratios: Tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.3)    # NPS uniform
    ablation_keep_ratios: Tuple[float, ...] = (0.02, 0.05)  # NPS focused with upper=2, and with log2 search
    ablation_upper: float = 2.0
    # the log-scale parametrisation SPEC §1 asks about: CMA-ES over log2(w) in [log_lower, log_upper]
    log_lower: float = _LOG_LOWER                 # 0.25
    log_upper: float = _LOG_UPPER                 # 8.0
    log_sigma0: float = _LOG_SIGMA0               # 1.0
    # σ0 ablation: NPS focused with these initial step sizes (besides `sigma0`) at these r
    sigma0_ablation: Tuple[float, ...] = (0.1, 1.0)
    sigma0_keep_ratios: Tuple[float, ...] = (0.05,)
    # generations study: one NPS focused search of `long_generations` at r = `long_keep`, test-scored
    # at the best-so-far of each checkpoint generation (its first `generations` generations are
    # exactly the grid's search: CMA-ES does not depend on the number of generations to come)
    long_generations: int = 24
    long_keep: Optional[float] = 0.05
    long_checkpoints: Tuple[int, ...] = (0, 1, 2, 4, 8, 12, 16, 24)
    # NPS search. bands, scheme and focus equal the CLI's defaults; generations and popsize are the
    # benchmark's own budget (the CLI's: 30 generations, CMA-ES' own 4 + 3 ln M population).
    bands: int = 8
    scheme: str = "focused"
    focus: float = 3.0
    generations: int = 8
    popsize: int = 8
    sigma0: float = _LIN_SIGMA0                   # 0.3
    lower: float = _LIN_LOWER                     # 0.0
    upper: float = _LIN_UPPER                     # 4.0
    seed: int = 0
    calib_size_text: int = 128
    calib_size_vision: int = 256
    test_rows_text: Optional[int] = 1000         # seeded subset of each text test split
    test_rows_vision: Optional[int] = None       # None: the full test split
    test_seed: int = 0
    # fusion
    fusion_keep: float = 0.05                   # the NPS-focused pruned vectors merged by NPS-merge
    ta_grid: Tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0, 1.2)
    ties_keep: float = 0.2
    ties_grid: Tuple[float, ...] = (0.8, 1.1, 1.4, 1.7, 2.0, 2.3, 2.5)
    nps_merge_grid: Tuple[float, ...] = (0.8, 1.1, 1.4, 1.7, 2.0, 2.3, 2.5)
    normalizations: Tuple[str, ...] = ("mask-count", "lambda-sum", "none")
    lambda_generations: int = 6
    # transfer (text suite only)
    transfer_tasks: Tuple[str, ...] = ("rt-sentiment", "tweet-sentiment")
    transfer_keep: float = 0.1
    transfer_lambdas: Tuple[float, ...] = (0.4, 0.7, 1.0, 1.3)
    knn_k: int = 10
    knn_ref_rows: int = 150
    knn_select_rows: int = 100
    knn_report_rows: int = 150
    # speed
    speed_sizes: Tuple[int, ...] = (10**6, 10**7, 10**8)
    # execution (do not change results)
    threads: int = 1
    jobs: int = 2
    batch_size: int = 64

    @classmethod
    def quick(cls, **over) -> "BenchConfig":
        base = dict(profile="quick", tasks_per_suite=1, keep_ratios=(0.05,), nps_keep_ratios=(0.05,),
                    uniform_keep_ratios=(0.05,), ablation_keep_ratios=(0.05,), sigma0_ablation=(1.0,),
                    sigma0_keep_ratios=(0.05,), long_generations=3, long_keep=0.05, long_checkpoints=(0, 2, 3),
                    generations=2, popsize=4, calib_size_text=64,
                    calib_size_vision=64, test_rows_text=None, ta_grid=(1.0,), ties_grid=(1.0,),
                    nps_merge_grid=(1.0,), lambda_generations=1, transfer_tasks=("rt-sentiment",),
                    transfer_keep=0.05, transfer_lambdas=(1.0,), knn_k=5, speed_sizes=(10**5,),
                    jobs=1)
        base.update(over)
        return cls(**base)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BenchConfig":
        names = {f.name: f for f in dataclasses.fields(cls)}
        out = {}
        for k, v in d.items():
            if k in names:
                out[k] = tuple(v) if isinstance(v, list) else v
        return cls(**out)

    def calib_size(self, suite: str) -> int:
        return self.calib_size_text if suite == "text" else self.calib_size_vision

    def test_rows(self, suite: str) -> Optional[int]:
        return self.test_rows_text if suite == "text" else self.test_rows_vision

    def search_params(self, suite: str) -> dict:
        return {"bands": self.bands, "focus": self.focus, "generations": self.generations,
                "popsize": self.popsize, "sigma0": self.sigma0, "lower": self.lower, "seed": self.seed,
                "calib_size": self.calib_size(suite)}

    def eval_params(self, suite: str) -> dict:
        return {"calib_size": self.calib_size(suite), "test_rows": self.test_rows(suite),
                "test_seed": self.test_seed, "seed": self.seed, "v": RESULTS_VERSION}


# ------------------------------------------------------------------ the result cache
def default_results_cache() -> Path:
    env = os.environ.get("NPS_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "nps-pruning"
    return root / "bench-results"


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ResultCache:
    """One JSON file per step: ``<dir>/<suite>/<task>/<step>-<hash>.json`` (atomic writes)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    def path(self, suite: str, task: str, step: str, params: dict) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in step)
        return self.root / suite / task / f"{safe}-{_hash(params)}.json"

    def get(self, suite, task, step, params) -> Optional[dict]:
        p = self.path(suite, task, step, params)
        if p.is_file():
            try:
                value = json.loads(p.read_text())
                self.hits += 1
                return value
            except json.JSONDecodeError:
                return None
        return None

    def put(self, suite, task, step, params, value: dict) -> dict:
        p = self.path(suite, task, step, params)
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(p, json.dumps({**value, "_step": step, "_params": params}, indent=1,
                                        default=_jsonable))
        self.misses += 1
        return value

    def step(self, suite, task, step, params, compute: Callable[[], dict], log=None) -> dict:
        got = self.get(suite, task, step, params)
        if got is not None:
            return got
        t0 = time.perf_counter()
        value = compute()
        value["seconds"] = time.perf_counter() - t0
        if log:
            log(f"{step}: {_brief(value)} ({value['seconds']:.1f}s)")
        return self.put(suite, task, step, params, value)


def _jsonable(o):
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _brief(v: dict) -> str:
    parts = []
    for k in ("test", "calib", "test_mean", "calib_mean", "lambda"):
        if k in v and v[k] is not None:
            x = v[k]
            if isinstance(x, float):
                parts.append(f"{k} {x:.4f}")
            elif isinstance(x, list) and x and isinstance(x[0], float):
                parts.append(f"{k} [{', '.join(f'{y:.3f}' for y in x)}]")
    return " ".join(parts)


def _logger(prefix: str):
    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] [{prefix}] {msg}", flush=True)
    return log


def _set_threads(n: int) -> None:
    import torch
    torch.set_num_threads(max(1, int(n)))


# ------------------------------------------------------------------ per-task plumbing
def task_dict(task) -> dict:
    """A TaskEntry as a plain dict (what workers receive)."""
    return asdict(task) if dataclasses.is_dataclass(task) else dict(task)


def stats_params(task: dict) -> dict:
    """{"running_stats": "finetuned"} for a model with BatchNorm running statistics (since they
    are kept whole by default, results differ from steps cached before), else {} (keys unchanged)."""
    from ..checkpoints import open_checkpoint
    from ..checkpoints.pair import is_running_stat
    if "_has_stats" not in task:
        task["_has_stats"] = any(is_running_stat(k) for k in open_checkpoint(task["finetuned"]).keys())
    return {"running_stats": "finetuned"} if task["_has_stats"] else {}


def _task_params(task: dict) -> dict:
    return {"task": task["name"], "key": task.get("key", ""), "finetuned": task["finetuned"],
            **stats_params(task)}


class TaskContext:
    """A task's Session and evaluators, built once (lazily: a fully cached task loads nothing)."""

    def __init__(self, suite: str, task: dict, cfg: BenchConfig):
        self.suite, self.task, self.cfg = suite, task, cfg
        self._session = None
        self._calib = None
        self._test = None

    @property
    def opts(self) -> PruneOptions:
        t, c = self.task, self.cfg
        return PruneOptions(pretrained=t["base"], finetuned=t["finetuned"], output="unused",
                            keep=0.05, bands=c.bands, scheme=c.scheme, focus=c.focus,
                            generations=c.generations, sigma0=c.sigma0, lower=c.lower, upper=c.upper,
                            popsize=c.popsize, seed=c.seed, calib_size=c.calib_size(self.suite),
                            batch_size=c.batch_size, max_length=t.get("max_length") or 128,
                            model_factory=t.get("model_factory"), quiet=True,
                            # this grid measures the paper's NPS (bench.wins measures the default)
                            space="magnitude", fitness="accuracy", holdout=0.0)

    @property
    def session(self):
        if self._session is None:
            from ..apps.prune import Session
            t = self.task
            self._session = Session.load(t["base"], t["finetuned"], model_factory=t.get("model_factory"),
                                         name=t["name"])
        return self._session

    @property
    def calib(self):
        if self._calib is None:
            self._calib = self.session.evaluator(self.task["eval_calib"], self.opts)
        return self._calib

    @property
    def test(self):
        if self._test is None:
            from ..evaluation import make_evaluator
            self._test = make_evaluator(self.task["eval_test"], model_path=self.task["finetuned"],
                                        calib_size=self.cfg.test_rows(self.suite), seed=self.cfg.test_seed,
                                        batch_size=self.cfg.batch_size,
                                        max_length=self.task.get("max_length") or 128)
        return self._test

    def nps_pruned(self, keep: float, scheme: str, upper: float, weights) -> "torch.Tensor":
        from ..core import build_candidate, make_bands
        values = self.session.task_vector.values
        bands = make_bands(values, self.cfg.bands, scheme, keep, self.cfg.focus)
        return build_candidate(values, bands, np.asarray(weights, dtype=np.float64), keep,
                               kept_values="weighted")


def nps_variants(cfg: BenchConfig) -> List[Tuple[str, str, float, float, dict]]:
    """(variant label, scheme, upper, keep, search settings it changes beyond scheme/upper) of every
    NPS search in the grid, in run order."""
    out = []
    keeps = list(cfg.nps_keep_ratios)
    first = [r for r in (0.05, 0.1) if r in keeps]            # the ones other steps reuse, first
    for r in first + [r for r in keeps if r not in first]:
        out.append(("focused", "focused", cfg.upper, r, {}))
    for r in cfg.uniform_keep_ratios:
        out.append(("uniform", "uniform", cfg.upper, r, {}))
    for r in cfg.ablation_keep_ratios:
        out.append((f"focused-upper{cfg.ablation_upper:g}", "focused", cfg.ablation_upper, r, {}))
    for r in cfg.ablation_keep_ratios:      # the log-scale parametrisation
        out.append(("focused-log", "focused", cfg.log_upper, r,
                    {"param": "log", "lower": cfg.log_lower, "sigma0": cfg.log_sigma0}))
    for sigma in cfg.sigma0_ablation:
        for r in cfg.sigma0_keep_ratios:
            out.append((f"focused-sigma{sigma:g}", "focused", cfg.upper, r, {"sigma0": float(sigma)}))
    if cfg.long_keep is not None and cfg.long_generations > cfg.generations:
        out.append(("focused-long", "focused", cfg.upper, cfg.long_keep, {"generations": cfg.long_generations}))
    return out


def nps_step_params(ctx_or_suite, task: dict, cfg: BenchConfig, scheme: str, upper: float, keep: float) -> dict:
    suite = ctx_or_suite if isinstance(ctx_or_suite, str) else ctx_or_suite.suite
    return {**_task_params(task), **cfg.eval_params(suite), **cfg.search_params(suite),
            "scheme": scheme, "upper": upper, "keep": keep}


# ------------------------------------------------------------------ job: pruning grid of one task
def run_pruning_job(suite: str, task: dict, cfg_dict: dict, cache_root: str) -> dict:
    cfg = BenchConfig.from_dict(cfg_dict)
    _set_threads(cfg.threads)
    cache = ResultCache(Path(cache_root))
    log = _logger(f"{suite}/{task['name']}")
    ctx = TaskContext(suite, task, cfg)
    ep = {**_task_params(task), **cfg.eval_params(suite)}
    t_job = time.perf_counter()
    rows: List[dict] = []

    def finetuned():
        s = ctx.session
        return {"test": s.score(ctx.test, s.task_vector.values), "calib": s.score(ctx.calib, s.task_vector.values),
                "test_rows": ctx.test.num_rows, "calib_rows": ctx.calib.num_rows,
                "num_entries": s.task_vector.num_entries,
                "task_specific_entries": int(sum(v.numel() for v in s.task_vector.task_specific.values())),
                "load_s": s.load_s}
    ft = cache.step(suite, task["name"], "finetuned", ep, finetuned, log)

    for method in cfg.baselines:
        for r in cfg.keep_ratios:
            def baseline(method=method, r=r):
                from ..core import PRUNERS
                s = ctx.session
                pruned = PRUNERS[method](s.task_vector.values, r, seed=cfg.seed)
                out = {"test": s.score(ctx.test, pruned)}
                if method == "magnitude":
                    tt = PRUNERS["ties-trim"](s.task_vector.values, r, seed=cfg.seed)
                    out["ties_trim_identical"] = bool(torch_equal(tt, pruned))
                return out
            res = cache.step(suite, task["name"], f"prune-{method}-r{r:g}", {**ep, "method": method, "keep": r},
                             baseline, log)
            rows.append({"method": method, "variant": None, "keep": r, **_strip(res)})

    for label, scheme, upper, r, extra in nps_variants(cfg):
        params = {**nps_step_params(suite, task, cfg, scheme, upper, r), **extra}

        def search(scheme=scheme, upper=upper, r=r, extra=extra, label=label):
            from ..apps.prune import prune_task
            from ..report.plots import search_curves
            s = ctx.session
            opts = dataclasses.replace(ctx.opts, keep=r, scheme=scheme, upper=upper, **extra)
            out = prune_task(s, "nps", opts, eval_spec=task["eval_calib"], progress=False)
            res = out.search
            curves = search_curves(res)
            more = {}
            if label == "focused-long":
                more["checkpoints"] = _checkpoints(ctx, res, r, scheme, upper, cfg.long_checkpoints)
            return {**more, "test": s.score(ctx.test, out.pruned), "calib": float(res.best_score),
                    "calib_magnitude": res.baseline_score, "weights": [float(w) for w in res.best_weights],
                    "best_so_far": [float(x) for x in curves["best_so_far"]],
                    "gen_best": [float(x) for x in curves["best"]],
                    "num_candidates": len(res.candidates), "search_s": float(res.seconds),
                    "eval_s_total": float(sum(c.get("eval_s") or 0.0 for c in res.candidates)),
                    "build_s_total": float(sum(c.get("build_s") or 0.0 for c in res.candidates)),
                    "bands_sizes": [out.bands.starts[i + 1] - out.bands.starts[i]
                                    for i in range(out.bands.num_bands)],
                    "stopped_early": res.stopped_early}
        res = cache.step(suite, task["name"], f"prune-nps-{label}-r{r:g}", params, search, log)
        rows.append({"method": "nps", "variant": label, "keep": r, **_strip(res)})
    return {"suite": suite, "task": task["name"], "finetuned": _strip(ft), "pruning": rows,
            "job_s": time.perf_counter() - t_job}


def _checkpoints(ctx: "TaskContext", res, keep: float, scheme: str, upper: float,
                 gens: Sequence[int]) -> List[dict]:
    """Test accuracy of the best-so-far candidate after each generation in ``gens`` of one search
    (exactly what a search stopped there returns; see ``best_up_to``)."""
    from ..search import best_up_to
    out, seen = [], {}
    for g in sorted(set(int(x) for x in gens)):
        best = best_up_to(res.candidates, g)
        if best is None:
            continue
        key = tuple(best["weights"])
        if key not in seen:
            pruned = ctx.nps_pruned(keep, scheme, upper, best["weights"])
            seen[key] = ctx.session.score(ctx.test, pruned)
        out.append({"generation": g, "calib": float(best["score"]), "test": float(seen[key]),
                    "weights": [float(w) for w in best["weights"]], "found_at": [int(best["gen"]), int(best["idx"])],
                    "candidates": sum(1 for c in res.candidates if int(c["gen"]) <= g)})
    return out


def torch_equal(a, b) -> bool:
    import torch
    return torch.equal(a, b)


def _strip(d: dict) -> dict:
    return {k: v for k, v in d.items() if not k.startswith("_")}


# ------------------------------------------------------------------ job: fusion + compression of a suite
def run_fusion_job(suite: str, tasks: List[dict], cfg_dict: dict, cache_root: str,
                   pruning: Dict[str, dict]) -> dict:
    """Fusion (Table 2) and compression (Table 3, Fig. 5) of all the suite's tasks."""
    import torch
    from ..apps.merge import merge_with_lambda_grid, merged_scores, nps_merge_lambdas
    from ..core.merge import MERGERS, nps_combine
    from ..task_vector import stack_values

    cfg = BenchConfig.from_dict(cfg_dict)
    _set_threads(cfg.threads)
    cache = ResultCache(Path(cache_root))
    log = _logger(f"{suite}/fusion")
    t_job = time.perf_counter()
    ctxs = [TaskContext(suite, t, cfg) for t in tasks]
    names = [t["name"] for t in tasks]
    base_params = {"tasks": [_task_params(t) for t in tasks], **cfg.eval_params(suite)}
    state: Dict[str, Any] = {}

    def sessions():
        return [c.session for c in ctxs]

    def calibs():
        return [c.calib for c in ctxs]

    def tests():
        return [c.test for c in ctxs]

    def taus():
        if "taus" not in state:
            state["taus"] = stack_values([c.session.task_vector for c in ctxs])
        return state["taus"]

    def nps_pruned():
        if "pruned" not in state:
            rows = []
            for c in ctxs:
                row = _find_nps(pruning[c.task["name"]], "focused", cfg.fusion_keep)
                rows.append(c.nps_pruned(cfg.fusion_keep, cfg.scheme, cfg.upper, row["weights"]))
            state["pruned"] = torch.stack(rows)
        return state["pruned"]

    def mopts(**over) -> MergeOptions:
        return MergeOptions(pretrained=tasks[0]["base"], finetuned=[t["finetuned"] for t in tasks],
                            output="unused", seed=cfg.seed, quiet=True, **over)

    def scored(merged, extra=None) -> dict:
        calib = merged_scores(sessions(), calibs(), merged)
        test = merged_scores(sessions(), tests(), merged)
        return {"calib": calib, "test": test, "calib_mean": float(np.mean(calib)),
                "test_mean": float(np.mean(test)), **(extra or {})}

    fusion: Dict[str, dict] = {}
    fusion["pre-trained"] = cache.step(suite, "_fusion", "pretrained", base_params,
                                       lambda: scored(torch.zeros_like(ctxs[0].session.task_vector.values)),
                                       log)
    ft_test = [pruning[n]["finetuned"]["test"] for n in names]
    ft_calib = [pruning[n]["finetuned"]["calib"] for n in names]
    fusion["fine-tuned"] = {"test": ft_test, "calib": ft_calib, "test_mean": float(np.mean(ft_test)),
                            "calib_mean": float(np.mean(ft_calib)), "note": "each task's own fine-tuned model"}
    fusion["average"] = cache.step(suite, "_fusion", "average", base_params,
                                   lambda: scored(MERGERS["average"](taus())), log)
    for method, keep, grid in (("task-arithmetic", 1.0, cfg.ta_grid), ("ties", cfg.ties_keep, cfg.ties_grid),
                               ("dare-ties", cfg.ties_keep, cfg.ties_grid)):
        def grid_merge(method=method, keep=keep, grid=grid):
            merged, lam, g = merge_with_lambda_grid(method, taus(), mopts(keep=keep, lambda_grid=list(grid)),
                                                    sessions(), calibs())
            return scored(merged, {"lambda": lam, "grid": g, "keep": keep})
        fusion[method] = cache.step(suite, "_fusion", method,
                                    {**base_params, "grid": list(grid), "keep": keep, "seed": cfg.seed},
                                    grid_merge, log)

    nps_params = {**base_params, "pruned": [nps_step_params(suite, t, cfg, cfg.scheme, cfg.upper, cfg.fusion_keep)
                                            for t in tasks]}
    norm_results = {}
    for norm in cfg.normalizations:
        def nps_grid(norm=norm):
            n = len(tasks)
            grid = []
            best = None
            lams = list(cfg.nps_merge_grid)
            if norm == "lambda-sum":
                # Σ λ·τ̂_i / Σ λ = mean τ̂_i for every common λ: one point of the grid says it all
                lams = lams[:1]
            for lam in lams:
                merged = nps_combine(nps_pruned(), [lam] * n, norm)
                score = float(np.mean(merged_scores(sessions(), calibs(), merged)))
                grid.append({"lambda": lam, "score": score})
                if best is None or score > best[1]:
                    best = (lam, score)
            merged = nps_combine(nps_pruned(), [best[0]] * n, norm)
            return scored(merged, {"lambda": best[0], "grid": grid, "normalize": norm})
        norm_results[norm] = cache.step(suite, "_fusion", f"nps-merge-grid-{norm}",
                                        {**nps_params, "grid": list(cfg.nps_merge_grid), "norm": norm}, nps_grid, log)
        fusion[f"NPS-merge ({norm}, single λ)"] = norm_results[norm]
    best_norm = max(cfg.normalizations, key=lambda n: (norm_results[n]["calib_mean"],
                                                      -cfg.normalizations.index(n)))

    def nps_search():
        opts = mopts(normalize=best_norm, lambda_grid=list(cfg.nps_merge_grid),
                     lambda_generations=cfg.lambda_generations)
        lambdas, grid, result = nps_merge_lambdas(sessions(), calibs(), nps_pruned(), opts, progress=False)
        merged = nps_combine(nps_pruned(), lambdas, best_norm)
        return scored(merged, {"lambda": [float(x) for x in lambdas], "normalize": best_norm,
                               "search_candidates": 0 if result is None else len(result.candidates)})
    fusion["NPS-merge"] = cache.step(suite, "_fusion", f"nps-merge-search-{best_norm}",
                                     {**nps_params, "grid": list(cfg.nps_merge_grid), "norm": best_norm,
                                      "gens": cfg.lambda_generations}, nps_search, log)

    # ---------------- compression
    comp = run_compression(suite, tasks, cfg, cache, ctxs, pruning, fusion, taus, nps_pruned, nps_params, log)
    return {"suite": suite, "tasks": names, "fusion": {k: _strip(v) for k, v in fusion.items()},
            "best_normalization": best_norm, "compression": comp, "job_s": time.perf_counter() - t_job}


def _find_nps(task_result: dict, variant: str, keep: float) -> dict:
    for row in task_result["pruning"]:
        if row["method"] == "nps" and row["variant"] == variant and abs(row["keep"] - keep) < 1e-12:
            return row
    raise KeyError(f"no NPS {variant} r={keep} result for {task_result['task']}")


def run_compression(suite, tasks, cfg, cache, ctxs, pruning, fusion, taus, nps_pruned, nps_params, log) -> dict:
    import torch
    from ..apps.compress import StoreTask, restore_task, store_info, write_store

    names = [t["name"] for t in tasks]
    n = len(tasks)
    ft = {nm: pruning[nm]["finetuned"] for nm in names}
    D = ft[names[0]]["num_entries"]
    head_entries = [ft[nm]["task_specific_entries"] for nm in names]
    ft_acc = [ft[nm]["test"] for nm in names]
    rows: List[dict] = []

    def row(label, test, total_bytes, bits_per_entry, extra=None):
        norm = [a / f if f > 0 else float("nan") for a, f in zip(test, ft_acc)]
        rows.append({"method": label, "test": list(test), "test_mean": float(np.mean(test)),
                     "normalized": norm, "normalized_mean": float(np.mean(norm)),
                     "total_bytes": int(total_bytes), "mb": total_bytes / 1e6,
                     "bits_per_entry": bits_per_entry, **(extra or {})})

    row("fine-tuned (N models)", ft_acc, 4 * (n * D + sum(head_entries)), 32.0,
        {"storage_note": "N full fp32 models: prunable entries + heads"})
    for method, label in (("task-arithmetic", "task arithmetic"), ("ties", "TIES")):
        f = fusion[method]
        row(label, f["test"], 4 * (D + sum(head_entries)), 32.0 / n,
            {"lambda": f["lambda"], "storage_note": "one merged fp32 body + each task's head"})

    nps_test = [_find_nps(pruning[nm], "focused", cfg.fusion_keep)["test"] for nm in names]
    for values_dtype, mask_coding, label in (("fp32", "packed", "NPS fp32 + packed mask (paper)"),
                                             ("fp16", "entropy", "NPS fp16 + entropy-coded mask")):
        def store_step(values_dtype=values_dtype, mask_coding=mask_coding):
            pruned = nps_pruned()
            with tempfile.TemporaryDirectory(prefix="nps-bench-store-") as tmp:
                store = Path(tmp) / "store"
                s0 = ctxs[0].session
                st_tasks = [StoreTask(c.task["name"], pruned[i], task_specific=c.session.task_vector.task_specific,
                                      buffers=c.session.task_vector.buffers) for i, c in enumerate(ctxs)]
                t0 = time.perf_counter()
                write_store(store, s0.base_flat, s0.task_vector.layout, st_tasks, values_dtype=values_dtype,
                            mask_coding=mask_coding, base_names=s0.task_vector.base_names)
                write_s = time.perf_counter() - t0
                info = store_info(store)
                tests, restore_s = [], 0.0
                for i, c in enumerate(ctxs):
                    t0 = time.perf_counter()
                    restored = restore_task(store, c.task["name"])
                    restore_s += time.perf_counter() - t0
                    s = c.session
                    if values_dtype == "fp32":
                        expected = s.base_flat + pruned[i]
                        if not torch.equal(restored.theta_flat, expected):
                            raise AssertionError(f"{c.task['name']}: fp32 store does not restore the pruned model")
                        tests.append(nps_test[i])        # = the pruned model's test score (bit-identical)
                    else:
                        s.ensure_model()
                        s.flat.copy_(restored.theta_flat)
                        tests.append(float(c.test(s.model)))
                per_task = info["tasks"]
                return {"test": tests, "total_bytes": info["total_bytes"],
                        "paper_formula_bytes": info["paper_formula_bytes"],
                        "bits_per_entry": float(np.mean([t["bits_per_entry"] for t in per_task])),
                        "mask_bits_per_entry": float(np.mean([t["mask_bits_per_entry"] for t in per_task])),
                        "paper_bits_per_entry": float(np.mean([t["paper_bits_per_entry"] for t in per_task])),
                        "pretrained_bytes": info["pretrained"]["bytes"], "write_s": write_s,
                        "restore_s": restore_s, "restore_checked": values_dtype == "fp32"}
        res = cache.step(suite, "_compression", f"store-{values_dtype}-{mask_coding}",
                         {**nps_params, "values": values_dtype, "mask": mask_coding}, store_step, log)
        row(label, res["test"], res["total_bytes"], res["bits_per_entry"],
            {k: res[k] for k in ("paper_formula_bytes", "mask_bits_per_entry", "paper_bits_per_entry",
                                 "pretrained_bytes", "write_s", "restore_s", "restore_checked")})
    return {"num_entries": D, "head_entries": head_entries, "keep": cfg.fusion_keep, "rows": rows}


# ------------------------------------------------------------------ job: transfer of one text task
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


def run_transfer_job(task: dict, suite_tasks: List[dict], cfg_dict: dict, cache_root: str,
                     pruning: dict) -> dict:
    import torch
    from ..apps.transfer import choose_lambda, scores_at
    from ..core import PRUNERS
    from .transfer_eval import KnnSourceEvaluator

    cfg = BenchConfig.from_dict(cfg_dict)
    _set_threads(cfg.threads)
    cache = ResultCache(Path(cache_root))
    log = _logger(f"text/{task['name']}/transfer")
    t_job = time.perf_counter()
    ctx = TaskContext("text", task, cfg)
    src_params = {"k": cfg.knn_k, "ref": cfg.knn_ref_rows, "select": cfg.knn_select_rows,
                  "report": cfg.knn_report_rows, "seed": cfg.seed,
                  "sources": [_task_params(t) for t in suite_tasks if t["name"] != task["name"]],
                  "quick": cfg.profile == "quick"}
    params = {**_task_params(task), **cfg.eval_params("text"), **src_params}
    state: Dict[str, Any] = {}

    def sources():
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
            row = _find_nps(pruning, "focused", cfg.transfer_keep)
            return ctx.nps_pruned(cfg.transfer_keep, cfg.scheme, cfg.upper, row["weights"])
        return PRUNERS[method](s.task_vector.values, cfg.transfer_keep, seed=cfg.seed)

    rows = []
    for method in ("pre-trained", "fine-tuned", "dare", "magnitude", "nps"):
        mp = dict(params, method=method, keep=cfg.transfer_keep, lambdas=list(cfg.transfer_lambdas))
        if method == "nps":
            mp["pruned"] = nps_step_params("text", task, cfg, cfg.scheme, cfg.upper, cfg.transfer_keep)

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
        res = cache.step("text", task["name"], f"transfer-{method}", mp, compute, log)
        rows.append({"method": method, **_strip(res)})
    return {"task": task["name"], "rows": rows, "job_s": time.perf_counter() - t_job}


# ------------------------------------------------------------------ speed
def run_speed(cfg: BenchConfig, bench_dir: Optional[Path]) -> Optional[dict]:
    """benchmarks/bench_candidate.py's bench_candidate (one subprocess per size, cfg.threads threads)."""
    if bench_dir is None or not (bench_dir / "bench_candidate.py").is_file():
        return None
    sys.path.insert(0, str(bench_dir))
    try:
        import bench_candidate as bc
    finally:
        sys.path.pop(0)
    t0 = time.perf_counter()
    rows = bc.bench_candidate(list(cfg.speed_sizes), 0.05, cfg.bands, 3, threads=cfg.threads)
    return {"rows": rows, "table": bc.format_table(rows), "seconds": time.perf_counter() - t0}
