"""Experiment: stores below half a bit per entry (issue 15; part of the compression experiment).

Real stores (``write_store`` / ``restore_task``) of each suite's tasks with every value coding of
:mod:`nps_pruning.store.value_coding`, on the slim task vectors of DARE and of the shipped default
NPS (the "NPS that wins" results: its band weights / space point, rebuilt exactly) at each
``cfg.coding_keeps``, and the anchors: TALL-masks on TIES (one merged vector + one mask per task,
the paper's comparison) and BitDelta-style sign + one scale per tensor of the dense τ (without
BitDelta's distillation). Each row: test accuracy of every restored task, normalized by the
fine-tuned model's, and the store's bits per prunable entry per task (mask + values, measured on
the written files; the pre-trained model and heads are counted apart).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

CODINGS = ("fp16", "q4", "q3", "q2", "sign")
TALL_LAMBDAS = (0.2, 0.3, 0.4, 0.5, 0.6)        # TALL-masks' λ grid (its paper's), chosen on calib


def default_point(ctx, row: dict, keep: float):
    """The shipped default (hybrid space) at the space point ``row["params"]`` that the "NPS that
    wins" search found, as a :class:`~nps_pruning.apps.merge.TaskPoint`: its space and prepared τ
    (domain, bands, index), all deterministic from τ and the search's bands and seed."""
    from nps_pruning.apps.merge import TaskPoint
    from nps_pruning.apps.settings import PruneSettings
    from nps_pruning.core.space import make_space
    st = PruneSettings()
    p = row.get("_params") or {}      # the cache's step parameters; results files may omit them
    st = st.replace(keep_ratio=keep, bands=int(p.get("bands", st.bands)), seed=default_seed(row),
                    space="hybrid")
    space = make_space("hybrid", st.bands, st.search.lower, st.search.upper, st.search.param,
                       keep_ratio=keep)
    return TaskPoint(space, ctx.session.prepared(st), np.asarray(row["params"], dtype=np.float64))


def default_seed(row: dict) -> int:
    """The seed the search of ``row`` ran with (its prepared τ's random order, hence its mask's)."""
    from nps_pruning.apps.settings import PruneSettings
    return int((row.get("_params") or {}).get("seed", PruneSettings().seed))


def point_pruned(ctx, point):
    """τ̂ of a :func:`default_point`."""
    return point.prepared.build(point.params)


def default_pruned(ctx, row: dict, keep: float):
    """τ̂ of the shipped default at the "NPS that wins" space point ``row["params"]``."""
    return point_pruned(ctx, default_point(ctx, row, keep))


def _store_scores(ctxs, pruned: List, coding: str) -> dict:
    """Write one real store of ``pruned`` (one τ̂ per task) with ``coding``, restore every task,
    and test it; bits per entry from the written files."""
    from nps_pruning.store import StoreTask, restore_task, store_info, write_store
    s0 = ctxs[0].session
    with tempfile.TemporaryDirectory(prefix="nps-bench-coding-") as tmp:
        store = Path(tmp) / "store"
        tasks = [StoreTask(c.task["name"], pruned[i], task_specific=c.session.task_vector.task_specific,
                           buffers=c.session.task_vector.buffers) for i, c in enumerate(ctxs)]
        write_store(store, s0.base_flat, s0.task_vector.layout, tasks, values_dtype=coding,
                    mask_coding="entropy", base_names=s0.task_vector.base_names)
        info = store_info(store)
        tests = []
        for c in ctxs:
            restored = restore_task(store, c.task["name"])
            s = c.session
            s.ensure_model()
            s.flat.copy_(restored.theta_flat)
            tests.append(float(c.test(s.model)))
    per = info["tasks"]
    return {"test": tests, "bits_per_entry": float(np.mean([t["bits_per_entry"] for t in per])),
            "mask_bits_per_entry": float(np.mean([t["mask_bits_per_entry"] for t in per])),
            "values_bits_per_entry": float(np.mean([t["values_bits_per_entry"] for t in per])),
            "total_bytes": info["total_bytes"]}


def _seeded_mask_bits(ctxs, pruned: List, seeds: List[int], domains: List) -> dict:
    """The mask cost of ``pruned`` under the store's ``seeded`` mask coding (each task's pruner
    seed and domain): a real store (fp32 values) is written, every task's τ̂ read back and checked
    bit for bit against ``pruned``, and the mask bits per entry taken from the written files. The
    mask is the same whatever the value coding, so this one store prices every coding's mask."""
    import torch
    from nps_pruning.store import StoreTask, read_store, store_info, write_store
    s0 = ctxs[0].session
    with tempfile.TemporaryDirectory(prefix="nps-bench-seeded-") as tmp:
        store = Path(tmp) / "store"
        tasks = [StoreTask(c.task["name"], pruned[i].float(), mask_seed=int(seeds[i]), mask_domain=domains[i])
                 for i, c in enumerate(ctxs)]
        write_store(store, s0.base_flat, s0.task_vector.layout, tasks, values_dtype="fp32",
                    mask_coding="seeded", embed_pretrained=False, base_names=s0.task_vector.base_names)
        opened = read_store(store)
        for i, c in enumerate(ctxs):
            if not torch.equal(opened.task_vector(c.task["name"]), pruned[i].float()):
                raise AssertionError(f"{c.task['name']}: the seeded store does not read back τ̂")
        per = store_info(store)["tasks"]
        orders = [opened.entry(c.task["name"])["mask_order"] for c in ctxs]
    return {"mask_bits_per_entry": float(np.mean([t["mask_bits_per_entry"] for t in per])),
            "mask_bits_per_task": [float(t["mask_bits_per_entry"]) for t in per], "orders": orders}


def _tall_masks(ctxs, fusion: dict, cfg, taus) -> dict:
    """TALL-masks on TIES: m_t = |τ_t| ≥ λ_t·|τ_MTL − τ_t| with τ_MTL the suite's TIES merge (at its
    chosen λ); task t is θ_pre + m_t ⊙ τ_MTL; λ_t from TALL_LAMBDAS on t's calibration rows. Storage:
    τ_MTL in fp32 once (32/N bits per entry per task) + each mask, range-coded."""
    from nps_pruning.store.mask_coding import encode_mask
    from nps_pruning.core.merge import merge
    T = taus()
    mtl = merge("ties", T, lam=float(fusion["ties"]["lambda"]), keep_ratio=cfg.ties_keep, seed=cfg.seed)
    tests, chosen, mask_bits, density = [], [], [], []
    for i, c in enumerate(ctxs):
        s = c.session
        dist = (mtl - T[i]).abs()
        best = None
        for lam in TALL_LAMBDAS:
            m = T[i].abs() >= lam * dist
            score = s.score(c.calib, mtl * m)
            if best is None or score > best[1]:
                best = (lam, score, m)
        lam, _, m = best
        tests.append(float(s.score(c.test, mtl * m)))
        chosen.append(lam)
        arrays = encode_mask(m.numpy(), "entropy")
        mask_bits.append(8 * sum(a.nbytes for a in arrays.values()) / m.numel())
        density.append(float(m.float().mean()))
    n = len(ctxs)
    return {"test": tests, "lambda": chosen, "density": density,
            "mask_bits_per_entry": float(np.mean(mask_bits)), "values_bits_per_entry": 32.0 / n,
            "bits_per_entry": float(np.mean(mask_bits)) + 32.0 / n}


def run_codings(suite: str, cfg, cache, ctxs, pruning: dict, fusion: dict, taus: Callable,
                base_params: dict, wins_rows: Optional[Dict[str, list]], log) -> List[dict]:
    """Rows (method, coding, keep, test, normalized, bits) of this experiment, every step cached."""
    from nps_pruning.core import PRUNERS
    from nps_pruning.core.prepared import prune_in_domain
    names = [c.task["name"] for c in ctxs]
    ft = [pruning[n]["finetuned"]["test"] for n in names]
    rows: List[dict] = []

    def add(method, coding, keep, res):
        norm = [a / f if f > 0 else float("nan") for a, f in zip(res["test"], ft)]
        rows.append({"method": method, "coding": coding, "keep": keep, **res, "test_mean": float(np.mean(res["test"])),
                     "normalized": norm, "normalized_mean": float(np.mean(norm))})

    def default_rows(keep):
        out = []
        for n in names:
            row = next((r for r in (wins_rows or {}).get(n, []) if r.get("method") == "nps-default"
                        and abs(r["keep"] - keep) < 1e-12 and r.get("params")), None)
            if row is None:
                return None
            out.append(row)
        return out

    for keep in cfg.coding_keeps:
        sources = {"DARE": (lambda keep=keep: [prune_in_domain(PRUNERS["dare"], c.session.task_vector.values, keep, c.session.domain, seed=cfg.seed)
                                               for c in ctxs]),
                   }
        wr = default_rows(keep)
        if wr is not None:
            sources["NPS (default)"] = lambda keep=keep, wr=wr: [default_pruned(c, r, keep) for c, r in zip(ctxs, wr)]
        seeds = {"DARE": [cfg.seed] * len(ctxs)}      # each pruner's seed (its domain: the session's)
        if wr is not None:
            seeds["NPS (default)"] = [default_seed(r) for r in wr]
        for method, make in sources.items():
            state = {}

            def pruned(make=make, state=state):
                if "v" not in state:
                    state["v"] = make()
                return state["v"]
            src = {"seed": cfg.seed} if method == "DARE" else {"points": [r["params"] for r in wr]}

            def seeded_step(method=method, pruned=pruned):
                return _seeded_mask_bits(ctxs, pruned(), seeds[method], [c.session.domain.spans for c in ctxs])
            seeded = cache.step(suite, "_compression", f"mask-seeded-{method.split()[0].lower()}-r{keep:g}",
                                {**base_params, "method": method, "keep": keep, **src, "mask": "seeded"},
                                seeded_step, log)
            for coding in CODINGS:
                res = cache.step(suite, "_compression", f"coding-{method.split()[0].lower()}-{coding}-r{keep:g}",
                                 {**base_params, "method": method, "coding": coding, "keep": keep, **src,
                                  "mask": "entropy"},
                                 lambda pruned=pruned, coding=coding: _store_scores(ctxs, pruned(), coding), log)
                extra = ({"search_test_mean": float(np.mean([r["test"] for r in wr]))}
                         if method != "DARE" else {})      # what the search itself measured
                extra.update(seeded_mask_bits_per_entry=seeded["mask_bits_per_entry"], mask_orders=seeded["orders"],
                             seeded_bits_per_entry=seeded["mask_bits_per_entry"] + res["values_bits_per_entry"])
                add(method, coding, keep, {**{k: v for k, v in res.items() if not k.startswith("_")}, **extra})
    dense = cache.step(suite, "_compression", "coding-bitdelta", {**base_params, "coding": "sign"},
                       lambda: _store_scores(ctxs, [c.session.task_vector.values for c in ctxs], "sign"), log)
    add("BitDelta-style (dense τ, sign + 1 scale per tensor, no distillation)", "sign", 1.0,
        {k: v for k, v in dense.items() if not k.startswith("_")})
    tall = cache.step(suite, "_compression", "tall-masks-ties",
                      {**base_params, "ties_lambda": fusion["ties"]["lambda"], "ties_keep": cfg.ties_keep,
                       "grid": list(TALL_LAMBDAS)}, lambda: _tall_masks(ctxs, fusion, cfg, taus), log)
    add("TALL-masks + TIES (merged fp32 vector shared + 1 mask per task)", "mask", None,
        {k: v for k, v in tall.items() if not k.startswith("_")})
    return rows
