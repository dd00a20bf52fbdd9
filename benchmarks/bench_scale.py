"""NPS pruning at scale (issue items 2–3): memory and time on a synthetic >= 10^9-parameter pair.

1. Generates (once; reused) a synthetic checkpoint pair in a cache folder outside git
   (``$NPS_CACHE/scale`` or ``/tmp/nps-scale``): ``N`` tensors of ``side × side`` (default
   40 × 5000² = 1.0e9 prunable parameters) stored as **bfloat16** safetensors in 4 shards per
   model (2 GB per model on disk), plus a task-specific head present only in the fine-tuned
   model. θ_pre ~ N(0, 0.02²); θ_ft = bf16(θ_pre + N(0, 1e-3²)) — so τ is quantized to a few
   bf16 steps, with the heavy exact ties a real bf16 fine-tune has.
2. Measures, in a FRESH subprocess per configuration (so the peak RSS is clean), the pipeline
   that a search runs, step by step:
   * ``load``: ``load_task_vector(dtype=τ dtype, base_dtype="checkpoint")``: streaming tensor
     by tensor from the memory-mapped shards into θ_pre (bf16, lossless) and τ;
   * ``bands``: ``make_bands`` (8 focused bands, r = 0.05; ``sorted_abs`` in τ's dtype);
   * ``build``: ``build_candidate(τ, bands, w, r, base=θ_pre, out=buf)`` into a float32 buffer
     of D entries (what a model's bound flat buffer is) — median of ``repeats`` random w;
   * ``floor``: ``buf.copy_(θ_pre); buf.add_(τ)``: plain passes no candidate build can beat
     (its memory is not counted in the peak).
   Peak memory is the process's VmHWM (Linux; includes memory-mapped file pages while they are
   mapped) and, separately, the peak of anonymous memory (RssAnon, sampled every 10 ms), both
   as GB and as a multiple of one float32 copy of the model (4 bytes × P, P = all parameters).
   A configuration whose estimated peak does not fit in MemAvailable is skipped, and says so.

Run: ``python benchmarks/bench_scale.py [--params 1e9] [--tau-dtype bfloat16 float32]
[--json out.json] [--threads 1]``. Prints a markdown table.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

_HERE = os.path.dirname(os.path.abspath(__file__))
_SRC = os.path.join(os.path.dirname(_HERE), "src")
GB = 1e9


def cache_root() -> Path:
    env = os.environ.get("NPS_CACHE")
    return Path(env) / "scale" if env else Path("/tmp/nps-scale")


# -- the synthetic checkpoint pair --------------------------------------------------------------
def generate(params: float = 1e9, side: int = 5000, root: Optional[Path] = None,
             shards: int = 4, progress: bool = True) -> Path:
    """Writes (or reuses) ``root/p{P}-s{side}-bf16/{base,ft}``; returns that folder."""
    import torch
    from safetensors.torch import save_file
    n = max(1, int(round(float(params) / (side * side))))
    root = Path(root) if root is not None else cache_root()
    folder = root / f"p{n * side * side}-s{side}-bf16"
    if (folder / "done.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-n // shards)
    head_rows = 16
    t0 = time.perf_counter()
    for which in ("base", "ft"):
        d = folder / which
        d.mkdir(exist_ok=True)
        weight_map = {}
        for sh in range(shards):
            idx = range(sh * per, min(n, (sh + 1) * per))
            if not len(idx):
                continue
            fname = f"model-{sh + 1:05d}-of-{shards:05d}.safetensors"
            tensors = {}
            for i in idx:
                g = torch.Generator().manual_seed(1000 + i)
                w = torch.randn(side, side, generator=g) * 0.02
                if which == "ft":
                    w += torch.randn(side, side, generator=torch.Generator().manual_seed(50000 + i)) * 1e-3
                tensors[f"layers.{i}.weight"] = w.to(torch.bfloat16)
                del w
            if which == "ft" and sh == 0:
                g = torch.Generator().manual_seed(7)
                tensors["head.weight"] = (torch.randn(head_rows, side, generator=g) * 0.02).to(torch.bfloat16)
            save_file(tensors, str(d / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in tensors})
            del tensors
            if progress:
                print(f"  wrote {which}/{fname} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    info = {"tensors": n, "side": side, "prunable": n * side * side,
            "params_ft": n * side * side + head_rows * side, "storage_dtype": "bfloat16",
            "generate_s": time.perf_counter() - t0}
    (folder / "done.json").write_text(json.dumps(info))
    return folder


# -- memory probes ------------------------------------------------------------------------------
def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _mem_available() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class _AnonPeak:
    """Samples RssAnon in a thread (VmHWM also counts mapped file pages)."""

    def __init__(self, every: float = 0.01):
        import threading
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._t.start()

    def _run(self, every):
        while not self._stop.is_set():
            v = _status_kib("RssAnon")
            if v is not None and v * 1024 > self.peak:
                self.peak = v * 1024
            time.sleep(every)

    def reset(self):
        v = _status_kib("RssAnon")
        self.peak = (v or 0) * 1024

    def stop(self):
        self._stop.set()
        self._t.join()


def _reset_hwm() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _measure(folder: str, tau_dtype: str, repeats: int, threads: Optional[int],
             keep_ratio: float = 0.05, num_bands: int = 8, seed: int = 0) -> Dict:
    """Runs in a fresh process."""
    import gc
    import statistics
    import numpy as np
    import torch
    if threads:
        torch.set_num_threads(int(threads))
    from nps_pruning.checkpoints import load_task_vector
    from nps_pruning.core import build_candidate, make_bands

    info = json.loads((Path(folder) / "done.json").read_text())
    P = int(info["params_ft"])
    fp32_model = 4 * P
    anon = _AnonPeak()
    steps = {}
    gc.collect()
    baseline = (_status_kib("VmRSS") or 0) * 1024     # the interpreter, torch, numpy: not data

    def step(name, fn):
        gc.collect()
        _reset_hwm()
        anon.reset()
        t = time.perf_counter()
        res = fn()
        dt = time.perf_counter() - t
        gc.collect()
        steps[name] = {"s": dt, "hwm_bytes": (_status_kib("VmHWM") or 0) * 1024,
                       "anon_peak_bytes": anon.peak,
                       "rss_after_bytes": (_status_kib("VmRSS") or 0) * 1024}
        return res

    base_flat, tv = step("load", lambda: load_task_vector(
        Path(folder) / "base", Path(folder) / "ft", dtype=tau_dtype, base_dtype="checkpoint"))
    tau = tv.values
    D = tau.numel()
    bands = step("bands", lambda: make_bands(tau, num_bands, "focused", keep_ratio,
                                             sorted_dtype=tau.dtype))
    out = step("alloc_out", lambda: torch.zeros(D, dtype=torch.float32))   # a model's flat buffer
    rng = np.random.default_rng(seed)
    ws = [np.ones(num_bands)] + [rng.uniform(0.5, 2.0, num_bands) for _ in range(repeats)]
    times = []

    def builds():
        for w in ws:
            t = time.perf_counter()
            build_candidate(tau, bands, w, keep_ratio, base=base_flat, out=out)
            times.append(time.perf_counter() - t)
    step("build", builds)
    floor_times = []

    def floors():
        for _ in range(max(1, repeats)):
            t = time.perf_counter()
            out.copy_(base_flat)          # two fp32 passes, no D-sized temporary (a plain
            out.add_(tau)                 # torch.add(bf16, bf16, out=fp32) would allocate one)
            floor_times.append(time.perf_counter() - t)
    step("floor", floors)
    anon.stop()
    nbytes = lambda t: t.numel() * t.element_size()   # noqa: E731
    pipeline = [s for k, s in steps.items() if k != "floor"]   # the floor is only a yardstick
    peak = max(s["hwm_bytes"] for s in pipeline)
    peak_anon = max(s["anon_peak_bytes"] for s in pipeline)
    return {
        "P": P, "D": D, "tau_dtype": str(tau.dtype).replace("torch.", ""),
        "base_dtype": str(base_flat.dtype).replace("torch.", ""),
        "sorted_abs_dtype": str(bands.sorted_abs.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(), "keep_ratio": keep_ratio, "num_bands": num_bands,
        "bytes": {"tau": nbytes(tau), "base": nbytes(base_flat), "band_of": nbytes(bands.band_of),
                  "sorted_abs": nbytes(bands.sorted_abs), "out": nbytes(out)},
        "load_s": steps["load"]["s"], "bands_s": steps["bands"]["s"],
        "build_s_median": statistics.median(times[1:]) if len(times) > 1 else times[0],
        "build_s_w1": times[0], "build_s_all": times,
        "floor_s_median": statistics.median(floor_times),
        "peak_bytes": peak, "peak_anon_bytes": peak_anon, "baseline_bytes": baseline,
        "peak_above_baseline_x_fp32_model": (peak - baseline) / fp32_model,
        "peak_x_fp32_model": peak / fp32_model, "peak_anon_x_fp32_model": peak_anon / fp32_model,
        "steps": steps,
    }


def _estimate_peak(P: int, tau_dtype: str) -> int:
    tau = 2 if tau_dtype in ("bfloat16", "float16") else 4
    # τ + θ_pre (bf16) + sorted_abs (τ's dtype) + band_of + out (fp32) + slack
    return int(P * (tau + 2 + tau + 1 + 4) + 1.0 * GB)


def bench_scale(params: float = 1e9, tau_dtypes=("bfloat16", "float32"), repeats: int = 3,
                threads: Optional[int] = 1, side: int = 5000, root: Optional[Path] = None,
                reference_d: int = 10**7) -> Dict:
    folder = generate(params, side, root)
    info = json.loads((folder / "done.json").read_text())
    rows: List[Dict] = []
    for td in tau_dtypes:
        need, avail = _estimate_peak(info["params_ft"], td), _mem_available()
        if avail is not None and need > avail:
            rows.append({"tau_dtype": td, "skipped": f"needs ~{need / GB:.1f} GB, "
                                                     f"{avail / GB:.1f} GB available"})
            continue
        code = ("import json, sys; sys.path.insert(0, %r); sys.path.insert(0, %r); "
                "from bench_scale import _measure; print(json.dumps(_measure(%r, %r, %d, %r)))"
                % (_SRC, _HERE, str(folder), td, int(repeats), threads))
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if proc.returncode != 0:
            rows.append({"tau_dtype": td, "skipped": f"failed (rc {proc.returncode}): "
                                                     f"{proc.stderr.strip()[-500:]}"})
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    ref = _reference_make_bands(reference_d, threads) if reference_d else None
    return {"checkpoint": info, "folder": str(folder), "rows": rows, "make_bands_vs_reference": ref}


def _reference_make_bands(D: int, threads: Optional[int]) -> Dict:
    """Old (stable sort + int64 order) vs new make_bands on one float32 vector, in a subprocess."""
    code = ("import json, sys, time, torch; sys.path.insert(0, %r)\n"
            "torch.set_num_threads(%d)\n"
            "from nps_pruning.core.bands import make_bands, _make_bands_reference\n"
            "v = torch.randn(%d, generator=torch.Generator().manual_seed(0)) * 1e-3\n"
            "t = time.perf_counter(); a = make_bands(v); new = time.perf_counter() - t\n"
            "t = time.perf_counter(); b = _make_bands_reference(v); old = time.perf_counter() - t\n"
            "assert torch.equal(a.band_of, b.band_of) and torch.equal(a.sorted_abs, b.sorted_abs)\n"
            "print(json.dumps({'D': %d, 'new_s': new, 'reference_s': old}))"
            % (_SRC, int(threads or 1), D, D))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"D": D, "error": proc.stderr.strip()[-500:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def format_table(result: Dict) -> str:
    info = result["checkpoint"]
    lines = [f"Synthetic pair: {info['tensors']} × {info['side']}² bf16 tensors "
             f"(D = {info['prunable']:.3g} prunable, P = {info['params_ft']:.4g} parameters), "
             f"8 focused bands, r = 0.05. Peak = VmHWM of a fresh process (mapped file pages "
             f"included); anon = peak RssAnon; baseline = RSS after imports (~0.4 GB). Multiples are of one float32 copy of the model "
             f"(4·P bytes = {4 * info['params_ft'] / GB:.1f} GB).", "",
             "| τ dtype | θ_pre | sorted_abs | load τ | make_bands | build_candidate (median) "
             "| floor θ_pre+τ | peak | peak anon | peak − baseline | threads |",
             "|" + "---|" * 11]
    for r in result["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['tau_dtype']} | skipped: {r['skipped']} |" + " |" * 9)
            continue
        lines.append(
            f"| {r['tau_dtype']} | {r['base_dtype']} | {r['sorted_abs_dtype']} | {r['load_s']:.1f} s "
            f"| {r['bands_s']:.1f} s | {r['build_s_median']:.2f} s | {r['floor_s_median']:.2f} s "
            f"| {r['peak_bytes'] / GB:.1f} GB ({r['peak_x_fp32_model']:.2f}×) "
            f"| {r['peak_anon_bytes'] / GB:.1f} GB ({r['peak_anon_x_fp32_model']:.2f}×) "
            f"| {r['peak_above_baseline_x_fp32_model']:.2f}× | {r['threads']} |")
    ref = result.get("make_bands_vs_reference")
    if ref and "new_s" in ref:
        lines += ["", f"make_bands at D = {ref['D']:.0e} (float32): {ref['new_s']:.2f} s, the stable-sort "
                      f"reference {ref['reference_s']:.2f} s ({ref['reference_s'] / ref['new_s']:.1f}× slower; "
                      "same Bands)."]
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=1e9)
    ap.add_argument("--side", type=int, default=5000)
    ap.add_argument("--tau-dtype", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--reference-d", type=float, default=1e7)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    res = bench_scale(a.params, a.tau_dtype, a.repeats, a.threads, a.side, a.cache, int(a.reference_d))
    print(format_table(res))
    if a.json is not None:
        res["written"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        a.json.write_text(json.dumps(res, indent=2))
