"""Memory on LLM-sized inputs (issue 38 item 2): the peak resident memory of `nps prune` and of a
3-task `nps merge` on SmolLM2-135M (the llm suite: full fine-tunes; llm-lora: LoRA adapters on
the same base), each run as its own process (``os.wait4``'s ru_maxrss of that child alone), against
one float32 copy of the model's prunable weights (4 bytes × D). Targets: a prune at most 4×, a
3-task merge at most 3×.

The checkpoints are the suites' *quick* profile (2 fine-tuning steps on 64 rows): the same model,
the same tensors and sizes as the full suites', so the same memory, at a fraction of the fine-tuning
time; their accuracies are not what this measures. Every measurement is a step (its key: the
checkpoints' tensor digests, the command, the code versions).

    python -m nps_bench.exp_llm_memory [--render-only]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

from .paths import repo_root

START, END = "<!-- llm-memory:start -->", "<!-- llm-memory:end -->"
VERSION = 4           # v2: one shared scoring model; v3: TIES trim as masks; v4: θ written in place
SUITES = ("llm", "llm-lora")
CALIB = 32            # calibration rows the searches use (memory does not grow with them)
TARGETS = {"prune": 4.0, "merge": 3.0}
SEARCH = ["--generations", "2", "--popsize", "4", "--keep", "0.05", "--calib-size", str(CALIB),
          "--batch-size", "16"]


def _run(argv: List[str], out: Path) -> dict:
    """Run ``nps ARGV`` as a child process; its peak RSS (ru_maxrss), wall time and report.json."""
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "nps_pruning.cli", *argv, "--quiet"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    err = p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"nps {argv[0]} failed: {err.decode(errors='replace')[-2000:]}")
    report = json.loads((out / "report.json").read_text())
    return {"peak_rss_bytes": int(ru.ru_maxrss) * 1024, "wall_s": time.perf_counter() - t0,
            "report_memory": report.get("memory"), "report": report}


RUNS = ("prune-nps", "prune-dare", "merge-ties", "merge-ties-bf16", "merge-nps")
LABELS = {"merge-ties-bf16": "merge --method ties --tau-dtype bfloat16"}
RUN_VERSIONS = {"prune-nps": 5, "prune-dare": 4, "merge-ties": 6, "merge-ties-bf16": 6}   # v5: prune frees the bands/index before taking θ_pre back; v6: top-k threshold without kthvalue's index tensor


def measure(suite_name: str, cache_root: str, only=RUNS) -> Dict[str, dict]:
    from .cache import ResultCache, _logger
    from .context import task_dict, weights_param
    from .suites import build_suite
    suite = build_suite(suite_name, quick=True)
    tasks = [task_dict(t) for t in suite.tasks]
    cache = ResultCache(Path(cache_root))
    log = _logger(f"llm-memory/{suite_name}")
    ckpts = {t["name"]: weights_param(t) for t in tasks}
    out: Dict[str, dict] = {}
    runs = {
        "prune-nps": ["prune", suite.base, tasks[0]["finetuned"], "--eval", tasks[0]["eval_calib"], *SEARCH],
        "prune-dare": ["prune", suite.base, tasks[0]["finetuned"], "--method", "dare", "--keep", "0.05"],
        "merge-ties": ["merge", suite.base, *[t["finetuned"] for t in tasks], "--method", "ties",
                       "--lambda", "1.0", "--keep", "0.2", "--names", *[t["name"] for t in tasks]],
        "merge-ties-bf16": ["merge", suite.base, *[t["finetuned"] for t in tasks], "--method", "ties",
                            "--lambda", "1.0", "--keep", "0.2", "--tau-dtype", "bfloat16",
                            "--names", *[t["name"] for t in tasks]],
        "merge-nps": ["merge", suite.base, *[t["finetuned"] for t in tasks], "--method", "nps",
                      *[x for t in tasks for x in ("--eval", t["eval_calib"])], *SEARCH,
                      "--lambda-grid", "1.0", "--lambda-generations", "0", "--names", *[t["name"] for t in tasks]],
    }
    for name, argv in runs.items():
        if name not in only:
            continue

        def one(argv=argv, name=name):
            with tempfile.TemporaryDirectory() as d:
                o = Path(d) / "out"
                got = _run([*argv, "-o", str(o)], o)
            rep = got.pop("report")
            m = rep.get("model") or {}
            # D: every prunable entry of the model (a LoRA prune's num_entries counts the changed
            # ones only: its unchanged tensors are reported apart)
            D = int(m.get("num_entries") or 0) + int(m.get("unchanged_entries") or 0) or None
            if D is None:          # merge reports carry no model block: D from the layout of τ
                from nps_pruning.checkpoints import load_task_vector
                from nps_pruning.checkpoints.external import resolve_input
                base = resolve_input(suite.base)
                D = load_task_vector(base, resolve_input(tasks[0]["finetuned"], base=base))[1].num_entries
            return {**got, "num_entries": D, "model_bytes": 4 * D,
                    "ratio": got["peak_rss_bytes"] / (4 * D)}
        params = {"v": RUN_VERSIONS.get(name, VERSION), "run": name, "argv": [a if not a.startswith("/") else Path(a).name for a in argv],
                  "checkpoints": ckpts}
        out[name] = cache.step(suite_name, "_memory", name, params, one, log)
    return {"tasks": [t["name"] for t in tasks], "checkpoints": ckpts, "runs": out}


def _first_measured(suite: str, name: str, checkpoints) -> dict:
    """The committed step of the earliest version of run ``name`` on these checkpoints (where the
    memory work started from), or {}."""
    found = []
    for p in (repo_root() / "benchmarks" / "results" / "steps" / suite / "_memory").glob(f"{name}-*.json"):
        d = json.loads(p.read_text())
        par = d.get("_params") or {}
        if par.get("run") == name and par.get("checkpoints") == checkpoints:
            found.append((int(par.get("v", 0)), d.get("_date", ""), d))
    return min(found, key=lambda t: t[:2])[2] if found else {}


def render(results: dict) -> str:
    lines = [START, "## Memory on LLM-sized inputs (SmolLM2-135M)", "",
             "Peak resident memory of one `nps` process (ru_maxrss of the child alone) against one "
             "float32 copy of the model's prunable weights (4 bytes × D), from "
             "`python -m nps_bench.exp_llm_memory`: the suites' quick-profile checkpoints (same model "
             f"and tensor sizes as the full suites); searches of 2 generations of 4 on {CALIB} "
             "calibration rows (memory does not grow with either). Targets (issue 38): a prune ≤ 4×, "
             "a 3-task merge ≤ 3×.", ""]
    for suite in SUITES:
        data = (results.get("suites") or {}).get(suite)
        if not data:
            continue
        lines += [f"### {suite} (commit {data.get('commit', '?')}, {data.get('date', '?')}; "
                  f"tasks {', '.join(data['tasks'])})", "",
                  "| command | peak RSS | one fp32 model | × | target | | first measured |",
                  "|---|---|---|---|---|---|---|"]
        for name, r in data["runs"].items():
            kind = name.split("-")[0]
            target = TARGETS[kind]
            label = LABELS.get(name, name.replace('-', ' --method ', 1))
            first = _first_measured(suite, name, data.get("checkpoints"))
            was = f"{first['ratio']:.1f}× (commit {first.get('_commit', '?')})" if first else ""
            lines.append(f"| `nps {label}` | {r['peak_rss_bytes'] / 2**30:.2f} GiB | "
                         f"{r['model_bytes'] / 2**30:.2f} GiB | {r['ratio']:.1f}× | ≤ {target:g}× | "
                         f"{'met' if r['ratio'] <= target else 'NOT met'} | {was} |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nps_bench.exp_llm_memory", description=__doc__.splitlines()[0])
    ap.add_argument("--suites", default=",".join(SUITES))
    ap.add_argument("--render-only", action="store_true")
    ap.add_argument("--runs", default=",".join(RUNS), help=f"which of {', '.join(RUNS)}")
    ap.add_argument("--results", default=str(repo_root() / "benchmarks" / "results" / "llm_memory.json"))
    ap.add_argument("--out", default=str(repo_root() / "BENCHMARKS.md"))
    args = ap.parse_args(argv)
    from nps_pruning.atomic import atomic_write_text
    from .cache import default_results_cache
    from .paths import git_output
    from .report_common import write_marked
    path = Path(args.results)
    results = json.loads(path.read_text()) if path.is_file() else {"suites": {}}
    if not args.render_only:
        for s in args.suites.split(","):
            got = measure(s, str(default_results_cache("full")), tuple(args.runs.split(",")))
            results["suites"][s] = {**got, "commit": git_output("rev-parse", "--short", "HEAD"),
                                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
            atomic_write_text(path, json.dumps(results, indent=1, default=str))
    write_marked(Path(args.out), START, END, render(results), after="<!-- frontier:end -->")
    if Path(args.out).resolve() == (repo_root() / "BENCHMARKS.md").resolve():
        from .freshness import refresh
        refresh()                 # its _memory steps' freshness
    return 0


if __name__ == "__main__":
    sys.exit(main())
