"""The real benchmark (SPEC §4): data loaders, the grayscale MobileNetV2, the converted DINOv2 ViT,
fine-tuning, cached suites.

    from nps_bench import build_suite
    suite = build_suite("text")   # or "vision" (MobileNetV2), "vit" (DINOv2 ViT-S/14)
"""
from __future__ import annotations

__all__ = ["build_suite", "Suite", "TaskEntry", "load_task", "TEXT_TASKS", "VISION_TASKS"]


def __getattr__(name):  # lazy: importing the package does not import torch / transformers
    if name in ("build_suite", "Suite", "TaskEntry"):
        from . import suites
        return getattr(suites, name)
    if name in ("load_task", "TEXT_TASKS", "VISION_TASKS"):
        from . import data
        return getattr(data, name)
    raise AttributeError(name)
