"""`nps compress`, `nps restore`, `nps info`: the command-line side of the compression store
(Eq. 8, App. C.3). The store format itself lives in :mod:`nps_pruning.store`."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict

import torch

from ..apps.merge import task_names
from ..apps.prune import prune
from ..apps.session import Session
from ..checkpoints import open_checkpoint, save_model_folder
from ..checkpoints.save import atomic_output_dir, check_not_input, check_output_dir, side_files
from ..errors import NPSError
from ..paths import safe_child, safe_relpath
from ..report.model_card import write_model_card
from ..report.report import json_text
from ..store import StoreTask, read_store, restore_task, store_info, write_store
from ..store.value_coding import group_sizes_of, is_float_coding, tune_level_scale
from ..store.write import check_destination
from ..workdirs import release_work_dir
from .common import prepare_work_dir
from .settings import check_prune_options, prune_settings


def run_compress(opts) -> Dict[str, Any]:
    if opts.tau_dtype != "float32":
        raise NPSError("--tau-dtype is supported by nps prune only (merges and stores use float32 τ)")
    t0 = time.perf_counter()
    names = task_names(opts.finetuned, opts.names)
    if opts.method == "nps" and len(opts.eval) != len(opts.finetuned):
        raise NPSError(f"--method nps needs one --eval SPEC per task ({len(opts.finetuned)} models, "
                       f"{len(opts.eval)} evaluators)")
    if opts.tune_levels and (is_float_coding(opts.values) or len(opts.eval) != len(opts.finetuned)):
        raise NPSError("--tune-levels needs a quantized --values coding (q2|q3|q4|q8|sign|sign-q2) and "
                       "one --eval SPEC per task")
    if opts.eval and len(opts.eval) != len(opts.finetuned):   # else opts.eval[i] fails mid-run
        raise NPSError(f"--eval gives {len(opts.eval)} evaluators for {len(opts.finetuned)} models "
                       "(one per task, in the same order)")
    inputs = [opts.pretrained, *opts.finetuned]
    check_store_destination(opts.output, inputs)      # before any search, not after it
    wd = prepare_work_dir(opts.output, opts.resume, inputs, check_output=False,
                          searches=opts.method == "nps")
    tasks, base_flat, layout, base_names, pruning = [], None, None, None, {}
    for i, (ft, name) in enumerate(zip(opts.finetuned, names)):
        session = Session.load(opts.pretrained, ft, model_factory=opts.model_factory, name=name,
                               allow_shape_mismatch=opts.allow_shape_mismatch,
                           running_stats=opts.running_stats,
                               need_model=opts.method == "nps" or opts.tune_levels > 0, device=opts.device)
        tv = session.task_vector
        if layout is None:
            base_flat, layout, base_names = session.base_flat.cpu(), tv.layout, tv.base_names
        elif tv.layout != layout:
            raise NPSError(f"{ft}: its prunable tensors differ from {opts.finetuned[0]}'s; "
                           "a store holds models of one architecture")
        spec = opts.eval[i] if opts.eval else None
        check_prune_options(opts.method, opts, spec)
        outcome = prune(session, opts.method, settings=prune_settings(opts), eval_spec=spec,
                        log_path=safe_child(wd, f"search-{name}.jsonl"), resume=opts.resume,
                        progress=not opts.quiet)
        pruning[name] = {"calibration": outcome.calibration,
                         "best_weights": getattr(outcome.search, "best_weights", None)}
        level_scale = None
        if opts.tune_levels:
            level_scale, before, after = _tune_task_levels(session, spec, outcome.pruned, layout, opts)
            pruning[name]["levels"] = {"factors": [float(x) for x in level_scale],
                                       "calib_least_squares": before, "calib_tuned": after}
        ckpt = open_checkpoint(ft)
        tasks.append(StoreTask(name, outcome.pruned.cpu(), dict(tv.task_specific), dict(tv.buffers),
                               side_files(ckpt.folder) if ckpt.folder else {},
                               {"method": opts.method, "source": str(ft)}, level_scale=level_scale,
                               mask_seed=prune_settings(opts).seed, mask_domain=session.domain.spans))
        del session
    write_store(opts.output, base_flat, layout, tasks, values_dtype=opts.values,
                           mask_coding=opts.mask, embed_pretrained=not opts.reference_pretrained,
                           pretrained_ref=str(Path(opts.pretrained).resolve()), base_names=base_names)
    release_work_dir(wd)
    info = store_info(opts.output)
    info["pruning"] = pruning
    info["seconds"] = time.perf_counter() - t0
    if not opts.quiet:
        _print_info(info)
    return info


def _tune_task_levels(session: Session, spec: str, pruned: torch.Tensor, layout, opts):
    """(factors, calibration score of the least-squares levels, of the tuned ones) of one task's
    quantized values (``opts.values``), tuned for ``opts.tune_levels`` generations on ``spec``."""
    settings = prune_settings(opts)
    evaluator = session.evaluator(spec, calib_size=settings.calib_size,
                                  fitness=session.search_fitness(spec, settings.fitness),
                                  **settings.evaluator_kwargs())
    pruned = pruned.detach().cpu().float()
    mask = pruned != 0
    sizes = group_sizes_of(mask.numpy(), [(a, b) for _, a, b, _ in layout.spans()])
    tau = torch.zeros_like(pruned)

    def score(decoded):
        tau[mask] = torch.from_numpy(decoded)
        return session.score(evaluator, tau)
    return tune_level_scale(pruned[mask].numpy(), sizes, opts.values, score, generations=opts.tune_levels,
                            seed=settings.seed)


def check_store_destination(output, inputs) -> None:
    """What write_store checks at the end, checked at the start: the store is not an input, and
    an existing folder there is empty or an nps store."""
    out = Path(output).expanduser().absolute()
    check_not_input(out, inputs)
    check_destination(out)


def load_base_flat(pretrained: str, layout, base_names: Dict[str, str]) -> torch.Tensor:
    """θ_pre in a store's layout, read tensor by tensor from the pre-trained checkpoint."""
    ckpt = open_checkpoint(pretrained)
    keys = set(ckpt.keys())
    out = torch.empty(layout.numel, dtype=torch.float32)
    for name, start, stop, shape in layout.spans():
        base_name = base_names.get(name, name)
        if base_name not in keys:
            raise NPSError(f"{pretrained}: has no tensor {base_name!r}; it is not this store's "
                           "pre-trained model")
        t = ckpt.get(base_name)
        if tuple(t.shape) != shape:
            raise NPSError(f"{pretrained}: tensor {base_name} has shape {tuple(t.shape)}, the store "
                           f"expects {shape}")
        out[start:stop].copy_(t.reshape(-1))
    return out


def run_restore(opts) -> Dict[str, Any]:
    check_output_dir(opts.output, inputs=[opts.store] + ([opts.pretrained] if opts.pretrained else []))
    store = read_store(opts.store)
    if opts.task not in store.tasks:
        raise NPSError(f"{opts.store}: no task {opts.task!r} (tasks: {', '.join(store.tasks)})")
    base = None
    if opts.pretrained:
        base = load_base_flat(opts.pretrained, store.layout, store.base_names)
    restored = restore_task(opts.store, opts.task, base)
    state = store.layout.unflatten(restored.theta_flat, cast=True)
    state = {k: v.contiguous() for k, v in state.items()}
    state.update(restored.task_specific)
    state.update(restored.buffers)
    inputs = [opts.store] + ([opts.pretrained] if opts.pretrained else [])
    with atomic_output_dir(opts.output, inputs=inputs) as tmp:
        save_model_folder(tmp, state, like=None, inputs=inputs)
        for fname, data in restored.side_files.items():   # names checked when the store opened
            target = safe_relpath(tmp, fname, what="side file")
            if target.exists():
                raise NPSError(f"{opts.store}: side file {fname!r} of task {opts.task!r} would "
                               "replace a file of the restored model")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        entry = next(t for t in store.manifest["tasks"] if t["name"] == opts.task)
        write_model_card(tmp, kind="restored", name=opts.task,
                         pretrained=opts.pretrained or store.pretrained.get("ref"),
                         method=str((entry.get("meta") or {}).get("method", "nps store")),
                         keep=entry.get("keep_ratio"),
                         note=f"Restored from the store {Path(opts.store).name} (task {opts.task!r}).")
    print(f"restored task {opts.task!r} to {opts.output}")
    return {"task": opts.task, "output": opts.output}


def run_info(opts) -> Dict[str, Any]:
    store = read_store(opts.store)
    if getattr(opts, "verify", False):
        store.verify()            # every sha256, every mask decoded: raises on the first bad part
    info = store.info()
    info["verified"] = bool(getattr(opts, "verify", False))
    if opts.json:
        print(json_text(info))
    else:
        _print_info(info)
        if info["verified"]:
            print("  verified: every part's sha256, θ_pre and every task's mask hold")
    return info


def _print_info(info: Dict[str, Any]) -> None:
    print(f"store {info['store']}: {info['num_tasks']} tasks, {info['num_entries']:,} prunable "
          f"entries, {info['total_bytes'] / 2**20:.2f} MiB "
          f"(paper's formula at fp32: {info['paper_formula_bytes'] / 2**20:.2f} MiB)")
    print(f"  bits per prunable entry: mask + values (split below, with the side data: each task's own "
          f"head, buffers and files), against the paper's 32r + 1")
    print(f"  {'task':24s} {'keep':>7s} {'values':>6s} {'mask':>8s} {'bits/entry':>10s} {'=mask':>7s} "
          f"{'+values':>7s} {'side':>7s} {'paper':>6s} {'MiB':>8s}")
    for t in info["tasks"]:
        print(f"  {t['name']:24s} {t['keep_ratio']:7.4f} {t['value_dtype']:>6s} {t['mask_coding']:>8s} "
              f"{t['bits_per_entry']:10.3f} {t['mask_bits_per_entry']:7.3f} {t['values_bits_per_entry']:7.3f} "
              f"{t['side_bits_per_entry']:7.3f} {t['paper_bits_per_entry']:6.2f} {t['bytes'] / 2**20:8.3f}")
