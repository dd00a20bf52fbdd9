"""Do the suites' fine-tunes rebuild bit for bit on another CPU? A probe, and its record.

The step files are keyed by the SHA-256 of the fine-tuned checkpoints' tensors, so they are
reused only where a checkpoint rebuilds to the same digest. On the same CPU model it does (the
rebuild tests); across CPU vendors it does not: on 2026-12-06 the ViT suite rebuilt on an AMD
EPYC to other digests than the Intel Xeon builds (docs/benchmark.md). Three libraries pick their
float kernels by CPU, and each one alone changes the digest of a quick ViT fine-tune on that
machine: MKL (GEMM; ``MKL_CBWR`` pins its code path), oneDNN (convolutions;
``ONEDNN_MAX_CPU_ISA`` caps its instruction set) and ATen's vectorized kernels
(``ATEN_CPU_CAPABILITY``). Pinned together (:data:`PIN_SETS`) the build is deterministic there;
whether it is then the same on an Intel CPU is what this probe records, one line per CPU model:

    python -m nps_bench.portability            # build the probes here, compare with the record
    python -m nps_bench.portability --record   # ... and add this CPU's digests to the record

Each probe is a quick-profile build (seconds) of one task, in a fresh process per setting (the
pins are read when the libraries start): ``native`` (no pins: what the benchmark does today) and
each pin set. The record is ``benchmarks/results/portability.json``; a setting is portable over
the CPUs recorded when every CPU got the same digest with it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from .paths import cpu_model, git_output, repo_root

PIN_SETS: Dict[str, Dict[str, str]] = {
    # AVX2 everywhere: MKL's conditional numerical reproducibility, oneDNN and ATen capped at AVX2
    "avx2": {"MKL_CBWR": "AVX2,STRICT", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
    # the most conservative code paths (slower)
    "sse": {"MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "SSE41", "ATEN_CPU_CAPABILITY": "default"},
}
PROBES = (("vit", "digits"), ("vision", "digits"))
RECORD = "benchmarks/results/portability.json"

_CHILD = """
import json, sys, tempfile
from nps_bench.suites import build_suite
with tempfile.TemporaryDirectory() as d:
    s = build_suite(sys.argv[1], cache_dir=d, tasks=[sys.argv[2]], quick=True, progress=False)
    print(json.dumps({"weights": s.tasks[0].weights, "acc": s.tasks[0].finetuned_acc}))
"""


def probe_env(setting: str, base: Optional[dict] = None) -> dict:
    """The environment of a probe's process: ``base`` (os.environ) without any pin, plus the
    pins of ``setting`` ("native": none)."""
    env = {k: v for k, v in (base if base is not None else os.environ).items()
           if k not in {p for pins in PIN_SETS.values() for p in pins}}
    env.update(PIN_SETS.get(setting, {}))
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def build_probe(suite: str, task: str, setting: str) -> dict:
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", _CHILD, suite, task], env=probe_env(setting),
                         capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return {**res, "seconds": round(time.time() - t0, 1)}


def compare(records: List[dict]) -> Dict[str, Dict[str, object]]:
    """For each setting and probe: the CPUs recorded and whether they all got one digest."""
    out: Dict[str, Dict[str, object]] = {}
    for rec in records:
        for setting, probes in rec.get("digests", {}).items():
            for probe, d in probes.items():
                e = out.setdefault(setting, {}).setdefault(probe, {"cpus": [], "digests": set()})
                e["cpus"].append(rec["cpu"])
                e["digests"].add(d)
    return {s: {p: {"cpus": e["cpus"], "same": len(e["digests"]) == 1} for p, e in ps.items()}
            for s, ps in out.items()}


def merge_record(records: List[dict], new: dict) -> List[dict]:
    """The record with ``new`` replacing any earlier line of the same CPU model and torch."""
    keep = [r for r in records if (r.get("cpu"), r.get("torch")) != (new["cpu"], new["torch"])]
    return keep + [new]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nps_bench.portability", description=__doc__.splitlines()[0])
    ap.add_argument("--record", action="store_true", help=f"add this CPU's digests to {RECORD}")
    ap.add_argument("--settings", default=",".join(("native",) + tuple(PIN_SETS)))
    args = ap.parse_args(argv)
    import torch
    path = repo_root() / RECORD
    records = json.loads(path.read_text())["records"] if path.is_file() else []
    new = {"cpu": cpu_model(), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "commit": git_output("rev-parse", "--short", "HEAD") or "?", "digests": {}, "seconds": {}}
    for setting in args.settings.split(","):
        for suite, task in PROBES:
            r = build_probe(suite, task, setting)
            name = f"{suite}/{task}"
            new["digests"].setdefault(setting, {})[name] = r["weights"]
            new["seconds"].setdefault(setting, {})[name] = r["seconds"]
            print(f"{setting:7s} {name:14s} {r['weights'][:16]}  quick fine-tuned acc {r['acc']:.4f}  "
                  f"{r['seconds']:.0f}s", flush=True)
    merged = merge_record(records, new)
    for setting, probes in compare(merged).items():
        for probe, e in probes.items():
            cpus = sorted(set(e["cpus"]))
            verdict = ("only this CPU model recorded" if len(cpus) < 2 else
                       "the same digest on every CPU recorded" if e["same"] else "DIFFERS between CPUs")
            print(f"{setting:7s} {probe:14s} {verdict} ({len(cpus)} CPU model(s): {'; '.join(cpus)})")
    if args.record:
        path.write_text(json.dumps({"probe": "quick-profile builds, one process per setting",
                                    "pins": PIN_SETS, "records": merged}, indent=1) + "\n")
        print(f"recorded in {RECORD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
