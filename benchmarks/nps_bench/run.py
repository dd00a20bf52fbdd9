"""`make bench`: run the benchmark (SPEC §4) and regenerate BENCHMARKS.md with its figures.

    python -m nps_bench.run [--suites text,vision,vit] [--quick] [--render-only] [--out BENCHMARKS.md]

* full profile: results go to ``benchmarks/results/*.json``, figures to ``benchmarks/figures/*.png``,
  the report to ``BENCHMARKS.md`` (repository root);
* ``--quick``: the CI smoke profile (quick suites: tiny splits, 1 epoch; one task per suite; r = 0.05;
  2 generations of 4); everything is written into a temporary folder (or next to ``--out``);
* ``--render-only``: re-render the report from the results JSON, nothing is run.

Every step is cached (see :mod:`.cache`; the full profile's steps in ``benchmarks/results/steps``,
committed), so an interrupted run resumes where it stopped. ``--budget MINUTES`` runs in pieces:
no step starts that its recorded time says would end after the budget, finished steps are kept
as they finish, and the run ends with exit 0 and a line saying what is left (the suites' results
and BENCHMARKS.md are written once a run finds every step); the same command again continues.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import json
import multiprocessing as mp
import os
import platform
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional

from nps_pruning.atomic import atomic_write_text
from .cache import (DEADLINE_ENV, BudgetReached, ResultCache, _jsonable, default_results_cache,
                    restores_deadline, set_budget)
from .config import BenchConfig
from .context import task_dict
from .paths import cpu_model, git_output, repo_root

REPO = repo_root()


def _repo_root() -> Path:
    return REPO


def machine_info() -> dict:
    info: Dict[str, Any] = {"hostname_hash": None, "nproc": os.cpu_count(), "platform": platform.platform(),
                            "python": platform.python_version()}
    info["cpu_model"] = cpu_model()
    try:
        mem = {l.split(":")[0]: l.split(":")[1].strip() for l in open("/proc/meminfo")}
        info["ram_gib"] = round(int(mem["MemTotal"].split()[0]) / 2**20, 1)
    except (OSError, KeyError, ValueError):
        info["ram_gib"] = None
    try:
        info["loadavg_start"] = os.getloadavg()
    except OSError:
        info["loadavg_start"] = None
    try:
        import torch
        info["torch"] = torch.__version__
    except ImportError:
        info["torch"] = None
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    return info


def _job(fn_name: str):
    """The job function a worker runs, by name (names travel to the worker processes)."""
    from .exp_fusion import run_fusion_job
    from .exp_merge_aware import run_merge_aware_job
    from .exp_pruning import run_pruning_job
    from .exp_transfer import run_transfer_job
    return {"run_pruning_job": run_pruning_job, "run_fusion_job": run_fusion_job,
            "run_merge_aware_job": run_merge_aware_job, "run_transfer_job": run_transfer_job}[fn_name]


def _timed(fn_name: str, *args):
    """Runs the job ``fn_name`` (:func:`_job`) on ``args`` and stamps wall-clock start/end (epoch
    seconds)."""
    t0 = time.time()
    out = _job(fn_name)(*args)
    out["t_start"], out["t_end"] = t0, time.time()
    return out


class _Inline:
    """A synchronous stand-in for a process pool (jobs = 1): results in submission order."""

    def submit(self, fn, *args):
        f: cf.Future = cf.Future()
        try:
            f.set_result(fn(*args))
        except BaseException as e:       # noqa: BLE001 - handed to the caller like a pool would
            f.set_exception(e)
        return f

    def shutdown(self, wait=True):
        pass


def _suite_summary(suite) -> dict:
    return {"name": suite.name, "base": suite.base, "quick": suite.quick,
            "tasks": [{k: getattr(t, k, None) for k in ("name", "kind", "num_classes", "finetuned_acc",
                                                        "pretrained_acc", "head_only_acc", "majority_acc",
                                                        "sizes", "key", "max_length", "weights")}
                      for t in suite.tasks]}


def _pick_tasks(name: str, cfg: BenchConfig) -> Optional[List[str]]:
    from . import data as bdata
    from .suites import SUITES
    names = list(SUITES[name])
    if cfg.tasks_per_suite is None:
        return None
    if name == "vision" and cfg.profile == "quick" and not bdata.FASHION_MNIST_DIR.is_dir():
        names = [n for n in names if n != "fashion-mnist"]
    return names[:cfg.tasks_per_suite]


def _wins_rows(results_dir: Path, suite: str) -> Optional[Dict[str, list]]:
    """The "NPS that wins" rows of a suite per task (make bench-wins' results), or None: the
    compression experiment stores the shipped default's slim vectors from their space points."""
    path = results_dir / "wins.json"
    if not path.is_file():
        return None
    return (json.loads(path.read_text()).get("suites", {}).get(suite) or {}).get("tasks")


EXPERIMENTS = ("transfer", "fusion", "merge-aware", "speed")
TRANSFER_SUITES = ("text", "llm", "llm-lora")   # the suites with a source ability to lose
CANON_SUITES = ("text", "vision", "vit", "llm", "llm-lora")     # --skip-able; pruning always runs (the others need it)


def _commit() -> str:
    return git_output("rev-parse", "--short", "HEAD") or "?"


def _committed_in(path: Path) -> str:
    """The commit that last committed ``path`` (who wrote an old results file without a stamp)."""
    return git_output("log", "-1", "--format=%h", "--", str(path)) or "?"


def run_benchmark(cfg: BenchConfig, *, results_dir: Path, cache_root: Path, command: str,
                  log=print, skip: tuple = (), pruning_from_results: bool = False) -> dict:
    """Run the suites of ``cfg`` (every step cached) and write their results. A run of some
    suites keeps the other suites' results (and, with ``speed`` skipped, the last speed
    measurement); each suite records the command, date and commit of the run that wrote it.
    ``pruning_from_results``: take each suite's pruning table from its results file instead of
    running it (the fusion and compression experiments then run on it)."""
    from .suites import build_suite
    bad = sorted(set(skip) - set(EXPERIMENTS))
    if bad:
        raise ValueError(f"--skip: unknown experiment(s) {', '.join(bad)} (choose from {', '.join(EXPERIMENTS)})")
    t_run = time.time()
    results_dir.mkdir(parents=True, exist_ok=True)
    old_meta = (json.loads((results_dir / "run.json").read_text())
                if (results_dir / "run.json").is_file() else {})

    def old_stamp(path: Path) -> dict:     # the run that wrote a results file without a stamp
        return {"command": old_meta.get("command", "?"), "date": old_meta.get("date", "?"),
                "commit": old_meta.get("commit") or _committed_in(path)}

    stamp = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "commit": _commit(),
             "skipped": list(skip)}
    meta = {"command": command, "date": stamp["date"], "commit": stamp["commit"], "started": t_run,
            "machine": machine_info(), "config": cfg.to_dict(), "results_cache": str(cache_root)}
    suites: Dict[str, dict] = {}
    suite_tasks: Dict[str, List[dict]] = {}
    previous: Dict[str, dict] = {}           # each suite's results file as it was before this run
    left: List[str] = []                     # --budget: what was not started
    left_s: List[float] = []
    deadline = os.environ.get(DEADLINE_ENV)
    for name in cfg.suites:
        if deadline and time.time() > float(deadline):
            left.append(f"{name}: the whole suite (its checkpoints were not built)")
            continue
        t0 = time.time()
        suite = build_suite(name, quick=cfg.profile == "quick", tasks=_pick_tasks(name, cfg), progress=True)
        suite_tasks[name] = [task_dict(t) for t in suite.tasks]
        suites[name] = {"suite": _suite_summary(suite), "tasks": {}, "transfer": {}, "fusion": None, "merge_aware": None,
                        "errors": [], "timings": {"suite_build_s": time.time() - t0, "jobs": {}},
                        "run": stamp}
        if (results_dir / f"{name}.json").is_file():   # a skipped experiment keeps its last results
            prev = previous[name] = json.loads((results_dir / f"{name}.json").read_text())
            if "transfer" in skip:
                suites[name]["transfer"] = prev.get("transfer", {})
            if "fusion" in skip:
                suites[name]["fusion"] = prev.get("fusion")
            if "merge-aware" in skip:
                suites[name]["merge_aware"] = prev.get("merge_aware")
        log(f"[{name}] suite ready: {', '.join(suite.task_names)} ({time.time() - t0:.0f}s)")

    cfg_d = cfg.to_dict()
    from nps_pruning.search.executors import die_with_parent
    # workers end with this process (a killed `make bench` leaves no step running on)
    pool = (cf.ProcessPoolExecutor(max_workers=cfg.jobs, mp_context=mp.get_context("spawn"),
                                   initializer=die_with_parent, initargs=(os.getpid(),))
            if cfg.jobs > 1 else _Inline())
    pending: Dict[cf.Future, tuple] = {}

    def submit(kind, suite, task, fn_name, *args):
        pending[pool.submit(_timed, fn_name, *args)] = (kind, suite, task)

    def submit_fusion(name, pruning):       # the jobs that need all of a suite's pruning results
        for kind, fn in (("fusion", "run_fusion_job"), ("merge-aware", "run_merge_aware_job")):
            if kind not in skip:
                submit(kind, name, "_all", fn, name, suite_tasks[name], cfg_d, str(cache_root), pruning,
                       _wins_rows(results_dir, name))

    for name in [n for n in cfg.suites if n in suites]:
        prev = results_dir / f"{name}.json"
        prev_tasks = previous.get(name, {}).get("tasks", {}) if pruning_from_results else {}
        if pruning_from_results and all(t["name"] in prev_tasks for t in suite_tasks[name]):
            # the pruning table as the results file holds it (the run that wrote it is kept in "run")
            suites[name]["tasks"] = {t["name"]: prev_tasks[t["name"]] for t in suite_tasks[name]}
            suites[name]["run"] = {**stamp, "pruning_from": previous[name].get("run") or old_stamp(prev)}
            submit_fusion(name, suites[name]["tasks"])
            continue
        if pruning_from_results:
            raise ValueError(f"--pruning-from-results: {prev} lacks the pruning results of some {name} tasks")
        for t in suite_tasks[name]:
            submit("pruning", name, t["name"], "run_pruning_job", name, t, cfg_d, str(cache_root))
    failed = False
    try:
        while pending:
            done, _ = cf.wait(list(pending), return_when=cf.FIRST_COMPLETED)
            for fut in done:
                kind, sname, tname = pending.pop(fut)
                S = suites[sname]
                try:
                    out = fut.result()
                except BudgetReached as e:   # not started: the budget is spent (not a failure)
                    recorded = previous.get(sname, {}).get("timings", {}).get("jobs", {})
                    est = (recorded.get(f"{kind}/{tname}") or {}).get("seconds")
                    left.append(f"{sname}: {kind} {tname} from step {e.step}"
                                + (f" (~{est / 60:.0f} min for the whole job last time)" if est else ""))
                    left_s.append(float(est or e.estimate_s or 0.0))
                    S["left"] = S.get("left", []) + [str(e)]
                    log(f"[{sname}] {e}")
                    continue
                except Exception as e:          # noqa: BLE001 - record, continue the other jobs
                    failed = True
                    msg = f"{kind} {tname}: {type(e).__name__}: {e}"
                    log(f"[{sname}] FAILED {msg}\n{traceback.format_exc()}")
                    S["errors"].append(msg)
                    continue
                S["timings"]["jobs"][f"{kind}/{tname}"] = {"seconds": out["t_end"] - out["t_start"],
                                                          "t_start": out["t_start"], "t_end": out["t_end"]}
                log(f"[{sname}] {kind} {tname} done in {out['t_end'] - out['t_start']:.0f}s")
                if kind == "pruning":
                    S["tasks"][tname] = out
                    if (sname in TRANSFER_SUITES and tname in cfg.for_suite(sname).transfer_tasks
                            and "transfer" not in skip):
                        task = next(t for t in suite_tasks[sname] if t["name"] == tname)
                        submit("transfer", sname, tname, "run_transfer_job", task, suite_tasks[sname], cfg_d,
                               str(cache_root), out, sname)
                    if len(S["tasks"]) == len(suite_tasks[sname]):
                        submit_fusion(sname, S["tasks"])
                elif kind == "transfer":
                    S["transfer"][tname] = out
                elif kind == "merge-aware":
                    S["merge_aware"] = out
                else:
                    S["fusion"] = out
                if not deadline:
                    _save_suite(results_dir, sname, S)
    finally:
        pool.shutdown(wait=True)
    if left:      # a run in pieces: the steps it finished are cached; nothing partial is written
        return {"left": left, "left_s": sum(left_s)}
    for sname, S in suites.items():
        spans = [j for j in S["timings"]["jobs"].values()]
        if spans:
            S["timings"]["wall_span_s"] = max(j["t_end"] for j in spans) - min(j["t_start"] for j in spans)
            S["timings"]["job_seconds_sum"] = sum(j["seconds"] for j in spans)
        _save_suite(results_dir, sname, S)
    t_speed = time.time()
    if "speed" in skip or (deadline and time.time() > float(deadline)):
        meta["speed"], meta["speed_s"] = old_meta.get("speed"), old_meta.get("speed_s", 0)
    else:
        log("speed: bench_candidate " + ", ".join(f"{d:.0e}" for d in cfg.speed_sizes))
        try:
            from .exp_speed import run_speed
            meta["speed"] = run_speed(cfg, _repo_root() / "benchmarks")
        except Exception as e:  # noqa: BLE001
            failed = True
            meta["speed"] = {"error": f"{type(e).__name__}: {e}"}
        meta["speed_s"] = time.time() - t_speed
    meta["finished"] = time.time()
    meta["total_s"] = meta["finished"] - t_run
    # every other suite with a results file (also one a concurrent per-suite run wrote meanwhile)
    kept = [n for n in dict.fromkeys([*old_meta.get("suites", []), *CANON_SUITES])
            if n not in cfg.suites and (results_dir / f"{n}.json").is_file()]
    meta["suites"] = kept + list(cfg.suites)      # the other suites' results stay as they were
    for n in kept:                                 # ... and say which run wrote them
        prev = json.loads((results_dir / f"{n}.json").read_text())
        if "run" not in prev:
            prev["run"] = old_stamp(results_dir / f"{n}.json")
            _save_suite(results_dir, n, prev)
    meta["failed"] = failed
    _write_json(results_dir / "run.json", meta)
    return load_results(results_dir)


def _write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, default=_jsonable))


def _save_suite(results_dir: Path, name: str, S: dict) -> None:
    _write_json(results_dir / f"{name}.json", S)


def load_results(results_dir: Path) -> dict:
    results_dir = Path(results_dir)
    run = json.loads((results_dir / "run.json").read_text()) if (results_dir / "run.json").is_file() else {}
    suites = {}
    canon = CANON_SUITES                            # the report's order, whichever run wrote a suite
    names = list(run.get("suites") or ("text", "vision"))
    for name in sorted(names, key=lambda n: (canon.index(n) if n in canon else len(canon), names.index(n))):
        p = results_dir / f"{name}.json"
        if p.is_file():
            suites[name] = json.loads(p.read_text())
    scale = None
    for cand in (results_dir / "scale.json",):
        if cand.is_file():
            try:
                scale = json.loads(cand.read_text())
            except json.JSONDecodeError:
                scale = None
    return {"meta": run, "suites": suites, "scale": scale}


def render_to(results: dict, out_md: Path, figures_dir: Path) -> Path:
    from .report_doc import render
    figures_dir.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(figures_dir, out_md.parent)
    md = render(results, figures_dir=figures_dir, figures_rel=rel)
    atomic_write_text(out_md, md)
    return out_md


@restores_deadline
def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nps_bench.run", description=__doc__.splitlines()[0])
    ap.add_argument("--suites", default="text,vision,vit,llm,llm-lora",
                    help="comma-separated: text,vision,vit,llm,llm-lora")
    ap.add_argument("--quick", action="store_true", help="CI smoke profile, written into a temporary folder")
    ap.add_argument("--render-only", action="store_true", help="re-render the report from the results JSON")
    ap.add_argument("--out", default=None, help="markdown output (default: BENCHMARKS.md; --quick: a temp dir)")
    ap.add_argument("--results-dir", default=None, help="results JSON folder (default: benchmarks/results)")
    ap.add_argument("--figures-dir", default=None, help="figures folder (default: benchmarks/figures)")
    ap.add_argument("--cache-dir", default=None, help="step results (default: benchmarks/results/steps; "
                                                      "--quick: $NPS_CACHE/bench-results-quick)")
    ap.add_argument("--budget", type=float, default=None, metavar="MINUTES",
                    help="start no step that would end after MINUTES from now; say what is left")
    ap.add_argument("--jobs", type=int, default=None, help="worker processes (default 2; quick: 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per worker (default 1)")
    ap.add_argument("--generations", type=int, default=None, help="NPS CMA-ES generations")
    ap.add_argument("--nps-keeps", default=None, help="keep ratios of the NPS-focused grid, e.g. 0.02,0.05,0.1")
    ap.add_argument("--uniform-keeps", default=None, help="keep ratios of the NPS-uniform grid")
    ap.add_argument("--ablation-keeps", default=None,
                    help="keep ratios of the upper-bound and log2 ablations, e.g. 0.02,0.05")
    ap.add_argument("--pruning-from-results", action="store_true",
                    help="use the pruning results in benchmarks/results/<suite>.json instead of running them")
    ap.add_argument("--skip", default="", help="experiments not to run this time (their last results are kept): "
                                              + ",".join(EXPERIMENTS))
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    suites = tuple(s.strip() for s in args.suites.split(",") if s.strip())
    over: Dict[str, Any] = {"suites": suites}
    if args.jobs is not None:
        over["jobs"] = args.jobs
    if args.threads is not None:
        over["threads"] = args.threads
    if args.generations is not None:
        over["generations"] = args.generations
    if args.nps_keeps:
        over["nps_keep_ratios"] = tuple(float(x) for x in args.nps_keeps.split(","))
    if args.uniform_keeps:
        over["uniform_keep_ratios"] = tuple(float(x) for x in args.uniform_keeps.split(","))
    if args.ablation_keeps:
        over["ablation_keep_ratios"] = tuple(float(x) for x in args.ablation_keeps.split(","))
    cfg = BenchConfig.quick(**over) if args.quick else BenchConfig(**over)
    root = _repo_root()
    if args.quick:
        out_md = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="nps-bench-quick-")) / "BENCHMARKS.md"
        base = out_md.parent
        results_dir = Path(args.results_dir) if args.results_dir else base / "results"
        figures_dir = Path(args.figures_dir) if args.figures_dir else base / "figures"
    else:
        out_md = Path(args.out) if args.out else root / "BENCHMARKS.md"
        results_dir = Path(args.results_dir) if args.results_dir else root / "benchmarks" / "results"
        figures_dir = Path(args.figures_dir) if args.figures_dir else root / "benchmarks" / "figures"
    out_md.parent.mkdir(parents=True, exist_ok=True)
    cache_root = (Path(args.cache_dir) if args.cache_dir
                  else default_results_cache("quick" if args.quick else "full"))
    if not set_budget(args.budget):
        print("nps-bench: error: --budget must be a positive number of minutes", file=sys.stderr)
        return 2
    command = "python -m nps_bench.run " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.render_only:
        results = load_results(results_dir)
        if not results["meta"]:
            print(f"nps-bench: error: {results_dir / 'run.json'}: no results to render", file=sys.stderr)
            return 2
    else:
        ResultCache(cache_root)
        results = run_benchmark(cfg, results_dir=results_dir, cache_root=cache_root, command=command.strip(),
                                skip=tuple(x for x in args.skip.split(",") if x),
                                pruning_from_results=args.pruning_from_results)
        if "left" in results:
            for line in results["left"]:
                print(f"  left: {line}", flush=True)
            print(f"budget reached: {len(results['left'])} job(s) left, about "
                  f"{results['left_s'] / 60:.0f} min by their recorded timings (0 = unknown); "
                  f"finished steps are in {cache_root}; run the same command again to continue",
                  flush=True)
            return 0
    render_to(results, out_md, figures_dir)
    wins_json = results_dir / "wins.json"
    if wins_json.is_file():       # the section "NPS that wins" (make bench-wins) from its own results
        from .wins import render as render_wins, write_section
        write_section(out_md, render_wins(json.loads(wins_json.read_text()), figures_dir))
        from .frontier import render as render_frontier, write_section as write_frontier
        write_frontier(out_md, render_frontier(json.loads(wins_json.read_text()), figures_dir))
    ablation_json = results_dir / "ablation.json"
    if ablation_json.is_file():   # the section "What the search is worth" (make bench-ablation)
        from .exp_search_ablation import render as render_ablation, write_section as write_ablation
        write_ablation(out_md, render_ablation(json.loads(ablation_json.read_text())))
    memory_json = results_dir / "llm_memory.json"
    if memory_json.is_file():     # "Memory on LLM-sized inputs" (nps_bench.exp_llm_memory)
        from .exp_llm_memory import END as M_END, START as M_START, render as render_memory
        from .report_common import write_marked
        write_marked(out_md, M_START, M_END, render_memory(json.loads(memory_json.read_text())),
                     after="<!-- frontier:end -->")
    if (Path(results_dir).resolve() == (_repo_root() / "benchmarks" / "results").resolve()
            and Path(out_md).resolve() == (_repo_root() / "BENCHMARKS.md").resolve()):
        from .readme_table import refresh
        refresh()                 # the README's results block, from the committed results
    print(f"wrote {out_md} (results: {results_dir}, figures: {figures_dir})", flush=True)
    return 1 if results["meta"].get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
