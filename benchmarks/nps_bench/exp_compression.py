"""Experiment: compression (Table 3, Fig. 5): N fine-tuned models, one merged model, and real NPS
stores written with ``write_store`` and restored with ``restore_task``. Run inside the fusion job
(it reuses the fusion results and the suite's pruned NPS vectors)."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import List

import numpy as np

from .context import _find_nps
from .exp_codings import run_codings
from .labels import FOCUSED


def run_compression(suite, tasks, cfg, cache, ctxs, pruning, fusion, taus, nps_pruned, nps_params, log,
                    base_params=None, wins_rows=None) -> dict:
    import torch
    from nps_pruning.store import StoreTask, restore_task, store_info, write_store

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
        if method not in fusion:          # a suite grid without this merge (the LLM suites)
            continue
        f = fusion[method]
        row(label, f["test"], 4 * (D + sum(head_entries)), 32.0 / n,
            {"lambda": f["lambda"], "storage_note": "one merged fp32 body + each task's head"})

    nps_test = [_find_nps(pruning[nm], FOCUSED, cfg.fusion_keep)["test"] for nm in names]
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
    codings = (run_codings(suite, cfg, cache, ctxs, pruning, fusion, taus, base_params, wins_rows, log)
               if base_params is not None and cfg.coding_keeps else [])
    return {"num_entries": D, "head_entries": head_entries, "keep": cfg.fusion_keep, "rows": rows,
            "codings": codings}
