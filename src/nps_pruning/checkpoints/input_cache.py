"""What the converters of inputs (GGUF files, LoRA adapters: :mod:`.external`, :mod:`.lora`)
share: the content-addressed cache they write model folders into, and the PEFT file names."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "chat_template.jinja",
                   "chat_template.json")


def one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:300]


def input_cache_dir() -> Path:
    env = os.environ.get("NPS_INPUT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "nps-pruning" / "inputs"


def content_sha256(paths, extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for p in paths:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()[:24]


def converted(folder: Path) -> bool:
    """A cache folder a conversion finished writing (its config and weights are there)."""
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))
