"""``nps eval``: score one model (folder, file, GGUF or LoRA adapter) with an evaluator."""
from __future__ import annotations

from ..checkpoints.external import CONVERSIONS
from ..errors import NPSError
from ..evaluation import evaluate_path
from ..report.report import json_text


def run_eval(opts) -> dict:
    if opts.pretrained and (CONVERSIONS.get(str(opts.model)) or {}).get("kind") != "lora":
        raise NPSError("--pretrained names the base of a LoRA adapter: MODEL is not an adapter folder")
    result = evaluate_path(opts.model, opts.eval, model_factory=opts.model_factory,
                           calib_size=opts.calib_size, seed=opts.seed, batch_size=opts.batch_size,
                           max_length=opts.max_length)
    if opts.json:
        print(json_text(result))     # valid JSON always: a non-finite score is null
    else:
        print(f"score {result['score']:.4f} on {result['num_rows']} rows "
              f"({result['seconds']:.1f} s)")
    return result
