"""`make bench-status`: what the benchmark has measured for the current code, without running it.

For each suite: its jobs as the last complete run recorded them (``benchmarks/results/<suite>.json``:
the tasks, their checkpoints' weight digests, each job's minutes) and, per task, the step files in
``benchmarks/results/steps`` (committed): a step is **current** when it was computed by code of
the numbers versions of today (:mod:`.code_versions`) on the checkpoint the suite records, else
**stale** (which group changed, or another checkpoint). A task with no current step file is
**missing**; the minutes still needed are summed from the recorded timings. Where this machine has
built a task's checkpoint (the suites' cache), its digest decides: fine-tunes rebuild bit for bit
on the same CPU model and software but not across CPU vendors, so a checkpoint built here on
another CPU makes the steps of the recorded one missing here, and the line says so.

    python -m nps_bench.status [--suites text,vision] [--steps-dir DIR] [--verbose]
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

from .cache import default_results_cache
from .code_versions import code_key, versions
from .paths import WEIGHTS_FILE, bench_cache_dir, repo_root

SUITES = ("text", "vision", "vit", "vit-long", "llm", "llm-lora")


STALE_MARK = "‡"


def row_stale(row: dict, suite: str, task: str) -> Optional[str]:
    """Why a results row (a step's value as the cache returned it: ``_step``, ``_code``) is no
    longer what the current code computes ("search v1 -> v2"), or None when it is current or
    carries no code record (rows older than the step keys: their sections say so)."""
    if not row.get("_step") or not isinstance(row.get("_code"), dict):
        return None
    return ", ".join(_code_whys(row, task, suite)) or None


def _code_whys(rec: dict, task: str, suite: Optional[str]) -> List[str]:
    """What makes a step record (``_step``, ``_code``, ``_params``) no longer what the current
    code computes: bumped code groups, and a shipped default's changed settings."""
    want = code_key(task, rec.get("_step", "?"), suite)
    have = rec.get("_code") or {}
    why = [f"{g} v{have[g]} -> v{v}" if g in have else f"{g} v{v}, a group its key predates"
           for g, v in want.items() if have.get(g) != v]
    return why + [w for w in (shipped_changed(rec.get("_params")),) if w]


# settings of a shipped-default step that are the step's own, not the default's
_STEP_OWN = ("keep", "calib_size", "batch_size", "max_length", "seed")


def shipped_changed(params: Optional[dict]) -> Optional[str]:
    """A step of the shipped default (its key holds the resolved settings it ran, ``shipped``, and
    the variant's ``over``) whose settings differ from those the same step resolves to today: the
    default changed without a code-version bump (e.g. its fitness, 2026-12-07), so the run looks
    the step up under another key and this record is not what it computes. None otherwise."""
    shipped = (params or {}).get("shipped")
    if not isinstance(shipped, dict):
        return None
    from nps_pruning.apps.settings import PruneSettings
    from .exp_search_ablation import settings_params
    over = {k: v for k, v in ((params or {}).get("over") or {}).items() if k != "_shipped"}
    now = settings_params(PruneSettings().replace(**over))
    keys = sorted((set(now) | set(shipped)) - set(_STEP_OWN))
    diff = [k for k in keys if _without_seed(shipped.get(k), k) != _without_seed(now.get(k), k)]
    return f"the shipped default changed since ({', '.join(diff)})" if diff else None


def _without_seed(v, key: str):
    return {k: x for k, x in v.items() if k != "seed"} if key == "search" and isinstance(v, dict) else v


def stale_note(stale: Dict[str, str]) -> List[str]:
    """The footnote under a table with cells marked :data:`STALE_MARK` (``stale``: what -> why)."""
    if not stale:
        return []
    return ["", f"{STALE_MARK} stale: no longer what the current code computes (run the benchmark "
                "again to refresh): " + "; ".join(f"{k}: {v}" for k, v in sorted(stale.items()))
                + "."]


def step_state(rec: dict, task: str, weights: Optional[str], suite: Optional[str] = None,
               task_weights: Optional[Dict[str, str]] = None) -> str:
    """"current", or "stale: why" for one step file's record (of ``suite``). ``task_weights``
    (task -> checkpoint digest) checks a shared step's (fusion, ...) ``_params["tasks"]``."""
    why = _code_whys(rec, task, suite)
    got_w = (rec.get("_params") or {}).get("weights")
    if weights and got_w and got_w != weights:
        why.append(f"checkpoint {got_w[:8]} -> {weights[:8]}")
    for t in (rec.get("_params") or {}).get("tasks") or ():
        want_w = (task_weights or {}).get(t.get("task")) if isinstance(t, dict) else None
        if want_w and t.get("weights") and t["weights"] != want_w:
            why.append(f"{t['task']}'s checkpoint {t['weights'][:8]} -> {want_w[:8]}")
    return "current" if not why else "stale: " + ", ".join(why)


def _steps_weights(newest: Dict[str, dict]) -> Optional[str]:
    """The checkpoint digest most of a task's newest step files were computed on."""
    ws = [((v["rec"].get("_params") or {}).get("weights")) for v in newest.values()]
    ws = [w for w in ws if w]
    return max(set(ws), key=ws.count) if ws else None


def local_checkpoint(task: str, newest: Dict[str, dict], cache_dir: Optional[Path]) -> Optional[dict]:
    """This machine's build of the task's checkpoint (the key its step files name, under the suites'
    cache ``cache_dir``): ``{"dir", "built_on", "weights"}`` (``weights`` from the digest file the
    benchmark writes beside it when it loads the suite; None before), or None when not built here."""
    if cache_dir is None or not Path(cache_dir).is_dir():
        return None
    keys = {(v["rec"].get("_params") or {}).get("key") for v in newest.values()} - {None, ""}
    for key in sorted(keys):
        for d in sorted(Path(cache_dir).glob(f"*/{task}/{key}")):
            if not (d / "info.json").is_file():
                continue
            try:
                info = json.loads((d / "info.json").read_text())
                side = d / WEIGHTS_FILE
                w = json.loads(side.read_text()).get("weights") if side.is_file() else None
            except (OSError, ValueError):
                continue
            return {"dir": str(d), "built_on": info.get("built_on"), "weights": w}
    return None


def planned_steps(suite: str, records: Dict[str, List[dict]]):
    """(the steps `make bench-wins` computes for each task of ``suite``, step -> the median of its
    recorded seconds over the suite's tasks; ``records``: task -> its step files' records): a
    task's planned step with no file is *missing*, its minutes estimated from the other tasks'
    (untimed where no task has it)."""
    from .wins import BENCH_SUITES, WinsConfig
    from .wins import planned_steps as wins_steps
    if suite not in BENCH_SUITES:
        return [], {}
    plan = wins_steps(WinsConfig())
    wanted = set(plan)
    seen: Dict[str, List[float]] = defaultdict(list)
    for task, recs in records.items():
        if task.startswith("_"):                 # the shared jobs' folders plan nothing per task
            continue
        for x in recs:
            if x["step"] in wanted:
                seen[x["step"]].append(float(x["rec"].get("seconds") or 0.0))
    return plan, {s: sorted(v)[len(v) // 2] for s, v in seen.items() if v}


def _read_records(paths: List[Path]) -> List[dict]:
    """Each readable step file as {"step", "mtime", "rec"}."""
    out = []
    for p in paths:
        try:
            rec = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        out.append({"step": rec.get("_step", p.stem), "mtime": p.stat().st_mtime, "rec": rec})
    return out


def suite_status(suite: str, steps_dir: Path, results_dir: Path, cache_dir: Optional[Path] = None,
                 code_only: bool = False) -> Dict:
    """Each task's (and shared job's) steps: current or stale, the minutes still needed.
    ``code_only``: judge the step files by the code alone (numbers versions and the shipped
    default's settings), not by which checkpoint they ran on: the same answer on every machine."""
    res_path = results_dir / f"{suite}.json"
    res = json.loads(res_path.read_text()) if res_path.is_file() else {}
    tasks = {t["name"]: t for t in (res.get("suite") or {}).get("tasks", [])}
    jobs = (res.get("timings") or {}).get("jobs", {})
    files: Dict[str, List[Path]] = defaultdict(list)
    sdir = steps_dir / suite
    for p in sorted(sdir.glob("*/*.json")) if sdir.is_dir() else ():
        files[p.parent.name].append(p)
    out = {"suite": suite, "commit": (res.get("run") or {}).get("commit"), "tasks": {}}
    # job timings are keyed kind/task; a suite's shared jobs ("fusion/_all", ...) keep their steps
    # in the _fusion / _compression / _merge_aware folders, listed from the files themselves
    job_tasks = {j.split("/", 1)[1] for j in jobs if "/" in j} - {"_all"}
    local_w: Dict[str, str] = {}               # task -> the digest of its checkpoint built here
    records = {task: _read_records(paths) for task, paths in files.items()}
    planned, seconds_of = planned_steps(suite, records)
    # the tasks first, then the shared jobs' folders (their steps name every task's checkpoint)
    for task in sorted(set(tasks) | set(files) | job_tasks, key=lambda n: (n.startswith("_"), n)):
        every: Dict[str, List[dict]] = defaultdict(list)
        for x in records.get(task, []):
            every[x["step"]].append(x)
        # the newest file of each step (by its recorded date; a fresh clone gives every file
        # the same mtime), for the checkpoint the steps name
        newest = {s: max(v, key=lambda x: (str(x["rec"].get("_date") or ""), x["mtime"]))
                  for s, v in every.items()}
        weights = None if code_only else (tasks.get(task) or {}).get("weights")
        recorded = weights or _steps_weights(newest)
        local = None if code_only else local_checkpoint(task, newest, cache_dir)
        if local and local.get("weights"):     # built here: what a run on this machine would reuse
            weights = local_w[task] = local["weights"]
        # a step is current when any of its files is (an older key's file stays in the repository
        # beside the new one after a change of code or settings)
        for s, v in every.items():
            ok = [x for x in v if step_state(x["rec"], task, weights, suite, local_w) == "current"]
            if ok:
                newest[s] = max(ok, key=lambda x: (str(x["rec"].get("_date") or ""), x["mtime"]))
        steps = {s: {"state": step_state(v["rec"], task, weights, suite, local_w),
                     "commit": v["rec"].get("_commit", "?"),
                     "seconds": float(v["rec"].get("seconds") or 0.0), "cpu": v["rec"].get("_cpu")}
                 for s, v in newest.items()}
        if steps and not task.startswith("_"):     # planned steps this task has no file of
            steps.update({s: {"state": "missing", "commit": "-", "seconds": None, "cpu": None}
                          for s in planned if s not in steps})
        here = local_w.get(task)            # the steps computed on this machine's checkpoint
        on_local = sum(1 for v in newest.values() if here and (v["rec"].get("_params") or {}).get("weights") == here)
        job_s = sum(float(j.get("seconds") or 0.0) for k, j in jobs.items() if k.split("/", 1)[-1] == task)
        current = [s for s, v in steps.items() if v["state"] == "current"]
        missing = [s for s, v in steps.items() if v["state"] == "missing"]
        stale_s = sum(v["seconds"] for v in steps.values() if v["state"] not in ("current", "missing"))
        stale_s += sum(seconds_of.get(s, 0.0) for s in missing)
        out["tasks"][task] = {"steps": steps, "current": len(current),
                              "stale": len(steps) - len(current) - len(missing), "missing": len(missing),
                              "missing_untimed": sum(1 for s in missing if s not in seconds_of),
                              "minutes_needed": (stale_s if steps else job_s) / 60.0,
                              "weights": weights, "recorded_weights": recorded, "local": local,
                              "on_local": on_local,
                              "cpus": sorted({v["cpu"] or "a CPU not recorded" for v in steps.values()})}
    return out


def _local_line(t: dict) -> List[str]:
    loc = t.get("local")
    if not loc:
        return []
    where = f"built here on {loc.get('built_on') or 'a CPU not recorded'}"
    if not loc.get("weights"):
        return [f"      {where}; its digest is not known yet (the benchmark writes it when it loads the suite)"]
    rec = t.get("recorded_weights")
    if not rec or rec == loc["weights"]:
        return [f"      {where}: the same checkpoint as the step files'"]
    if t.get("on_local"):      # re-computed here in part: say so, not that every step is redone
        return [f"      {where}: a different checkpoint ({loc['weights'][:12]}) from the last complete "
                f"run's ({rec[:12]}); {t['on_local']} of the steps were computed on it here, a run "
                "here computes the others again (fine-tunes rebuild bit for bit only on the same CPU model)"]
    return [f"      {where}: a different checkpoint ({loc['weights'][:12]}) from the step files' "
            f"({rec[:12]}; steps computed on {', '.join(t.get('cpus') or ['?'])}); fine-tunes rebuild bit for "
            "bit only on the same CPU model, so a run here computes these steps again"]


def render(statuses: List[Dict], verbose: bool = False) -> str:
    lines = [f"numbers versions of the code: " + ", ".join(f"{g} v{v}" for g, v in versions().items())]
    total = 0.0
    for st in statuses:
        lines.append(f"suite {st['suite']} (last complete run: {st['commit'] or 'none recorded'})")
        if not st["tasks"]:
            lines.append("  no recorded jobs and no step files")
        for task, t in st["tasks"].items():
            total += t["minutes_needed"]
            if not t["steps"]:
                state = "missing: no step files"
            else:
                commits = sorted({v["commit"] for v in t["steps"].values() if v["state"] == "current"})
                state = (f"{t['current']} current (commit {', '.join(commits) or '-'}), {t['stale']} stale"
                         + (f", {t['missing']} never computed" + (f" ({t['missing_untimed']} of them never timed)"
                                                                  if t.get("missing_untimed") else "")
                            if t.get("missing") else ""))
            lines.append(f"  {task:18s} {state}; about {t['minutes_needed']:.0f} min to compute"
                         + (f"; checkpoint {t['weights'][:12]}" if t.get("weights") else ""))
            lines.extend(_local_line(t))
            if verbose:
                for s, v in sorted(t["steps"].items()):
                    took = "?" if v["seconds"] is None else f"{v['seconds']:.0f}s"
                    lines.append(f"      {s:40s} {v['state']} ({v['commit']}, {took})")
    lines.append(f"about {total:.0f} min of steps still needed (recorded timings; fine-tunes not included)")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nps_bench.status", description=__doc__.splitlines()[0])
    ap.add_argument("--suites", default=",".join(SUITES))
    ap.add_argument("--steps-dir", default=None, help="default: benchmarks/results/steps")
    ap.add_argument("--results-dir", default=None, help="default: benchmarks/results")
    ap.add_argument("--cache-dir", default=None, help="the suites' checkpoints built on this machine "
                    "(default: $NPS_CACHE/bench, ~/.cache/nps-pruning/bench)")
    ap.add_argument("--verbose", action="store_true", help="list every step")
    args = ap.parse_args(argv)
    steps = Path(args.steps_dir) if args.steps_dir else default_results_cache("full")
    results = Path(args.results_dir) if args.results_dir else repo_root() / "benchmarks" / "results"
    cache = Path(args.cache_dir) if args.cache_dir else bench_cache_dir()
    statuses = [suite_status(s, steps, results, cache) for s in args.suites.split(",") if s]
    print(render(statuses, args.verbose))
    return 0


if __name__ == "__main__":
    sys.exit(main())
