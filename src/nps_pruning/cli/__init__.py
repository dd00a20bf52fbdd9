"""The ``nps`` command: thin argument handling around the library (SPEC §3).

Every subcommand's flags come from its options dataclass in :mod:`nps_pruning.cli.options`, so
``nps run CONFIG.yaml`` accepts exactly the same settings. Errors are one line on stderr and a
non-zero exit.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, List, Optional

from .. import __version__
from ..errors import NPSError
from .options import COMMANDS, add_arguments, from_namespace, load_yaml_config

DESCRIPTIONS = {
    "prune": "Prune a fine-tuned model's task vector with NPS (or a baseline) and write the slim model.",
    "transfer": "θ_pre + λ·τ̂: learn the new task while keeping the original ability (Eq. 6).",
    "merge": "Merge several fine-tuned models of one pre-trained model (Eq. 7 and baselines).",
    "compress": "Store N fine-tuned models as one pre-trained model plus a mask and values per task.",
    "restore": "Rebuild one task's model from a store.",
    "info": "Show what a store holds, its size and bits per entry.",
    "eval": "Score a model with an evaluator.",
    "demo": "Run the embedded default on the shipped real benchmark.",
}

EPILOG = """evaluator SPECs:
  text-classification:FILE      CSV/TSV or JSONL with columns text,label (accuracy)
  image-classification:FILE     NPZ with arrays images,labels, optional mean,std (accuracy)
  multiple-choice:FILE          causal LM: JSONL context,choices,label (summed log-likelihoods)
  perplexity:FILE               causal LM: text paragraphs or JSONL text; exp(-mean token NLL)
  generation:FILE               causal LM: JSONL prompt,answer; exact match of greedy output
  lm-eval:TASK[,TASK...]        lm-evaluation-harness tasks (pip install 'nps-pruning[lm-eval]')
  python:MODULE:FUNCTION        FUNCTION(model) -> float, higher is better

model inputs: a Hugging Face model folder, a Hub id org/name[@revision] (through huggingface_hub's
cache; HF_HUB_OFFLINE=1 uses the cache only; a local path of that name wins), a .safetensors file
(with --model-factory), a GGUF file (*.gguf, dequantized to float32) or a PEFT LoRA adapter
folder (applied to PRETRAINED, or for nps eval to --pretrained, else to the adapter's
base_model_name_or_path); converted inputs are cached under $NPS_INPUT_CACHE (default
~/.cache/nps-pruning/inputs).
"""


def _runner(command: str) -> Callable:
    """Import lazily: `nps --help` must not pay for torch/transformers."""
    if command == "prune":
        from .prune import run_prune
        return run_prune
    if command == "transfer":
        from .transfer import run_transfer
        return run_transfer
    if command == "merge":
        from .merge import run_merge
        return run_merge
    if command in ("compress", "restore", "info"):
        from . import store
        return getattr(store, f"run_{command}")
    if command == "eval":
        from .eval import run_eval
        return run_eval
    if command == "demo":
        try:                      # the benchmark is its own package (benchmarks/, make demo installs it)
            from nps_bench.demo import run_demo
        except ModuleNotFoundError as e:
            if e.name not in ("nps_bench", "nps_bench.demo"):
                raise
            raise NPSError("nps demo runs the benchmark package nps_bench, which is not installed: "
                           "run `make demo` in a checkout (or `pip install -e benchmarks`)") from None
        return run_demo
    raise NPSError(f"command {command!r} is not built yet")


class _Parser(argparse.ArgumentParser):
    """argparse with the project's error format: one ``nps: error:`` line, exit 2."""

    def error(self, message: str):
        print(f"nps: error: {' '.join(str(message).split())}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="nps", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="NPS-Pruning: slimmer fine-tuned models for transfer, fusion and compression "
                    "(Du et al., ACL 2025).")
    parser.add_argument("--version", action="version", version=f"nps-pruning {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, cls in COMMANDS.items():
        p = sub.add_parser(name, help=DESCRIPTIONS[name], description=DESCRIPTIONS[name],
                           epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
        add_arguments(p, cls)
    p = sub.add_parser("run", help="Run a command from a YAML config (same keys as the flags).",
                       description="Run a command from a YAML config: a mapping with `command:` "
                                   "(one of " + ", ".join(COMMANDS) + ") and that command's options "
                                   "as keys (flag names with - or _).")
    p.add_argument("config", help="YAML file")
    return parser


def _quiet_transformers() -> None:
    """No "Loading weights" bar from transformers for every model nps loads (our own progress
    is shown instead; --quiet silences that). Cheap: transformers is not imported here."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")   # read when huggingface_hub loads
    if "transformers" in sys.modules:                               # already loaded (in-process use)
        sys.modules["transformers"].utils.logging.disable_progress_bar()


def os_error_text(e: OSError) -> str:
    """One line for an OSError: the path (bounded) and the system's reason."""
    where = str(e.filename) if e.filename is not None else ""
    if len(where) > 120:
        where = where[:60] + "..." + where[-40:]
    reason = e.strerror or type(e).__name__
    return f"{where}: {reason}" if where else " ".join(str(e).split())[:300]


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _quiet_transformers()
    try:
        if args.command == "run":
            command, opts = load_yaml_config(args.config)
        else:
            command = args.command
            opts = from_namespace(COMMANDS[command], args)
        include = getattr(opts, "lm_eval_include", None)
        if include:                                  # read by lm-eval: evaluators (and workers)
            from ..evaluation.lm_harness import INCLUDE_ENV
            if not Path(include).is_dir():
                raise NPSError(f"--lm-eval-include {include}: not a folder")
            os.environ[INCLUDE_ENV] = str(Path(include).resolve())
        from .common import resolve_options
        _runner(command)(resolve_options(opts))     # GGUF files and LoRA adapters -> model folders
    except NPSError as e:
        print(f"nps: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nps: interrupted", file=sys.stderr)
        return 130
    except OSError as e:          # the system's refusal (name too long, read-only, disk full)
        print(f"nps: error: {os_error_text(e)}", file=sys.stderr)
        return 2
    return 0


