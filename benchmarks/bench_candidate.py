"""Per-candidate cost of the fast exact NPS mask vs a top-k reference (SPEC §1, "Fast exact mask").

For each D (one fresh subprocess per size, so peak-memory numbers do not mix):
  * ``make_bands_s``  — the one-off global sort that builds the bands;
  * ``fast_s``        — ``build_candidate(τ, bands, w, r, base=θ_pre, out=buf)``: the per-candidate
                        cost inside a search (bands already built);
  * ``ref_s``         — a plain per-candidate build: key = w[band]·|τ|, the k-th largest by
                        ``torch.topk`` or ``torch.kthvalue`` (the faster of the two is reported,
                        ``ref_method``), mask, θ_pre + mask·w[band]·τ;
  * ``floor_s``       — one pass ``torch.add(θ_pre, τ, out=buf)``: no method can beat it;
  * ``fast_extra_mem_x`` / ``ref_extra_mem_x`` — peak resident memory added by one candidate
                        build, as a multiple of τ's size (Linux: VmHWM after a reset through
                        /proc/self/clear_refs; ``None`` where that is unavailable).
Times are the best of ``repeats``. Run: ``python benchmarks/bench_candidate.py [D ...]``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

_SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def _rss_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_extra_bytes(fn) -> Optional[int]:
    """Peak RSS growth (bytes) while running fn(), or None if the peak cannot be reset."""
    if not _reset_peak():
        return None
    before = _rss_kib("VmRSS")
    fn()
    peak = _rss_kib("VmHWM")
    if before is None or peak is None:
        return None
    return max(0, peak - before) * 1024


def _measure_one(D: int, keep_ratio: float, num_bands: int, repeats: int, seed: int = 0,
                 threads: Optional[int] = None) -> Dict:
    """Runs in a fresh process: all the timings for one size."""
    import torch
    if threads:
        torch.set_num_threads(int(threads))
    from nps_pruning.core import build_candidate, keep_count, make_bands

    gen = torch.Generator().manual_seed(seed)
    tau = torch.randn(D, generator=gen) * 1e-3
    base = torch.randn(D, generator=gen) * 0.05
    out = torch.zeros(D)   # touched: the output buffer (a model's flat buffer) already exists
    w = (torch.rand(num_bands, generator=gen) + 0.5)
    k = keep_count(D, keep_ratio)

    t0 = time.perf_counter()
    bands = make_bands(tau, num_bands, "focused", keep_ratio=keep_ratio)
    make_s = time.perf_counter() - t0

    def best(fn):
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return min(ts)

    def fast():
        build_candidate(tau, bands, w, keep_ratio, base=base, out=out)

    def reference(method):
        def run():
            wv = w[bands.band_of.long()] * tau
            key = wv.abs()
            if method == "topk":
                idx = torch.topk(key, k, sorted=False).indices
                mask = torch.zeros(D, dtype=torch.bool)
                mask[idx] = True
            else:
                v = torch.kthvalue(key, D - k + 1).values
                mask = key >= v   # (a tie at v would need a fix-up; continuous data has none)
            torch.add(base, wv * mask, out=out)
        return run

    def floor():
        torch.add(base, tau, out=out)

    fast()  # warm-up
    fast_s = best(fast)
    fast_mem = _peak_extra_bytes(fast)
    floor_s = best(floor)
    ref_times = {m: best(reference(m)) for m in ("kthvalue", "topk")}
    ref_method = min(ref_times, key=ref_times.get)
    ref_mem = _peak_extra_bytes(reference(ref_method))
    tau_bytes = tau.numel() * tau.element_size()
    return {
        "D": D, "keep_ratio": keep_ratio, "num_bands": num_bands, "threads": torch.get_num_threads(),
        "make_bands_s": make_s, "fast_s": fast_s, "ref_s": ref_times[ref_method],
        "ref_method": ref_method, "ref_topk_s": ref_times["topk"],
        "ref_kthvalue_s": ref_times["kthvalue"], "floor_s": floor_s,
        "speedup": ref_times[ref_method] / fast_s, "fast_over_floor": fast_s / floor_s,
        "fast_extra_mem_x": None if fast_mem is None else fast_mem / tau_bytes,
        "ref_extra_mem_x": None if ref_mem is None else ref_mem / tau_bytes,
    }


def bench_candidate(sizes: Sequence[int] = (10**6, 10**7, 10**8), keep_ratio: float = 0.05,
                    num_bands: int = 8, repeats: int = 3, threads: Optional[int] = None) -> List[Dict]:
    """One fresh subprocess per size; returns one dict per size (see the module docstring).
    ``threads``: torch intra-op threads in the subprocess (None: torch's default). On a machine
    shared with other work, 1 gives steadier numbers (oversubscribed OpenMP barriers dominate
    small elementwise ops otherwise)."""
    rows = []
    for D in sizes:
        code = ("import json, sys; sys.path.insert(0, %r); sys.path.insert(0, %r); "
                "from bench_candidate import _measure_one; "
                "print(json.dumps(_measure_one(%d, %r, %d, %d, threads=%r)))"
                % (_SRC, os.path.dirname(os.path.abspath(__file__)), int(D), float(keep_ratio),
                   int(num_bands), int(repeats), threads))
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"benchmark for D={D} failed:\n{proc.stderr[-2000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return rows


def format_table(rows: List[Dict]) -> str:
    def mem(x):
        return "n/a" if x is None else f"{x:.2f}x"
    head = ("| D | make_bands (once) | fast build_candidate | reference (method) | floor base+τ "
            "| speedup vs ref | fast / floor | fast extra mem | ref extra mem |")
    lines = [head, "|" + "---|" * 9]
    if rows:
        lines.insert(0, f"keep ratio {rows[0]['keep_ratio']}, {rows[0]['num_bands']} focused bands, "
                        f"torch threads {rows[0]['threads']}, best of repeats\n")
    for r in rows:
        lines.append(
            f"| {r['D']:.0e} | {r['make_bands_s']:.3f} s | {r['fast_s'] * 1e3:.1f} ms "
            f"| {r['ref_s'] * 1e3:.1f} ms ({r['ref_method']}) | {r['floor_s'] * 1e3:.1f} ms "
            f"| {r['speedup']:.1f}x | {r['fast_over_floor']:.1f}x | {mem(r['fast_extra_mem_x'])} "
            f"| {mem(r['ref_extra_mem_x'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sizes", nargs="*", type=float, default=[1e6, 1e7, 1e8])
    ap.add_argument("--keep", type=float, default=0.05)
    ap.add_argument("--bands", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    result = bench_candidate([int(x) for x in a.sizes], a.keep, a.bands, a.repeats, a.threads)
    print(format_table(result))
