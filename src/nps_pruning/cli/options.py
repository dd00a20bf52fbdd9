"""Typed, validated options: one dataclass per command, whose fields become CLI flags and YAML keys.

``nps prune A B -o OUT --keep 0.05`` and a YAML file ``{command: prune, pretrained: A,
finetuned: B, output: OUT, keep: 0.05}`` produce the same :class:`PruneOptions`, validated by the
same code, so the two forms cannot drift apart.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Type

from ..apps.settings import MergeSettings, PruneSettings
from ..errors import NPSError, short
from ..registries import (Choices, executors, fitnesses, mask_codings, merge_option, mergers, normalizations,
                          pruners, schemes, spaces, tau_dtypes, value_dtypes)
from ..search.cmaes_search import PARAM_DEFAULTS, POPSIZE_MAX, POPSIZE_MIN, SUBSPACES, shipped_search
from ..search.cpu_linear import CPU_LINEARS
from ..search.race import RACE_OFF, RACES
from ..yaml_safe import read_yaml


def opt(default: Any = None, help: str = "", *, flag: str | None = None, short: str | None = None,
        choices: "tuple | Choices | Callable[[], Iterable[str]] | None" = None,
        lo: float | None = None, hi: float | None = None,
        lo_open: bool = False, positional: bool = False, many: bool = False, required: bool = False):
    """A dataclass field with what the CLI and the validator need to know about it. ``choices``
    is a fixed tuple, or a zero-argument callable returning a registry's names (read lazily,
    the field's default listed first: see :class:`Choices`)."""
    if callable(choices) and not isinstance(choices, Choices):
        choices = Choices(choices, first=default if isinstance(default, str) else None)
    meta = dict(help=help, flag=flag, short=short, choices=choices, lo=lo, hi=hi, lo_open=lo_open,
                positional=positional, many=many, required=required)
    if many or isinstance(default, list):
        return field(default_factory=lambda: list(default or []), metadata=meta)
    return field(default=default, metadata=meta)


SEED_MAX = 2**32 - 1    # seeds feed numpy's and cmaes' generators, which take 0 .. 2**32 - 1
INT_MAX = 2**63 - 1     # every integer option fits a C long (torch, numpy, argparse need no more)

# The search's defaults are shipped_search()'s (search/cmaes_search.py), the only place they are
# written: PARAM_DEFAULTS (bounds and step size by parametrisation) is re-exported from there.
_SEARCH = shipped_search()   # what `nps prune` runs with no flags
_PRUNE = PruneSettings()     # and the pruning settings' (apps/settings.py): keep, bands, hold-out, ...
_MERGE = MergeSettings()     # and the merge settings' (their merge options: core.merge.MERGE_OPTIONS)
_LIN, _LOG = PARAM_DEFAULTS["linear"], PARAM_DEFAULTS["log"]


# -- shared option groups (inherited) -----------------------------------------------------------

@dataclass
class SearchOptions:
    keep: float = opt(_PRUNE.keep_ratio, "fraction of prunable entries kept (exactly round(keep*D) entries)",
                      lo=0.0, hi=1.0, lo_open=True)
    bands: int = opt(_PRUNE.bands, "number of magnitude-rank bands M searched by NPS", lo=1, hi=255)
    scheme: str = opt(_PRUNE.scheme, "where the band cuts go", choices=schemes)
    focus: float = opt(_PRUNE.focus, "focused scheme: the first M-1 bands split the top min(1, focus*keep) ranks",
                       lo=0.0, lo_open=True)
    generations: int = opt(_SEARCH.generations, "CMA-ES generations", lo=0)
    sigma0: Optional[float] = opt(None, "CMA-ES initial step size, in the units of --param "
                                        f"(default: {_LIN[2]} linear, {_LOG[2]} log2)",
                                  lo=0.0, lo_open=True)
    lower: Optional[float] = opt(None, "lower bound of every band weight "
                                       f"(default: {_LIN[0]:g} linear, {_LOG[0]:g} log)", lo=0.0)
    upper: Optional[float] = opt(None, "upper bound of every band weight "
                                       f"(default: {_LIN[1]:g} linear, {_LOG[1]:g} log)",
                                 lo=0.0, lo_open=True)
    param: str = opt(_SEARCH.param, "search band weights directly (linear) or their log2 (log)",
                     choices=lambda: tuple(PARAM_DEFAULTS))
    popsize: Optional[int] = opt(_SEARCH.popsize, "CMA-ES population (default: the library's "
                                                  "4+3 ln M)", lo=POPSIZE_MIN, hi=POPSIZE_MAX)
    kept_values: str = opt(_PRUNE.kept_values, "kept entries carry their band weight or their original value",
                           choices=("weighted", "original"))
    space: str = opt(_SEARCH.space, "NPS search space: 'magnitude' is the paper's (band weights over a "
                               "magnitude top-k); 'hybrid' adds a global rescale and a random share "
                               "(uniform or rank-weighted) that reaches DARE: both baselines are in it",
                     choices=spaces)
    subspace: str = opt(_SEARCH.subspace, "which coordinates CMA-ES moves after the start "
                                          "points: 'family' holds the hybrid's random share at "
                                          "0 when the best start is (rescaled) magnitude top-k; "
                                          "'full': every coordinate",
                        choices=SUBSPACES)
    fitness: Optional[str] = opt(None, "what a candidate is scored by on calibration data: "
                                       "accuracy, mean log-likelihood of the labels, or label-free "
                                       "agreement with the fine-tuned model's predictions (default: "
                                       "loglik-t, the log-likelihood at the fitted temperature; "
                                       "perplexity: loglik; a python: evaluator's own score)",
                                 choices=Choices(fitnesses, first="loglik-t"))
    holdout: float = opt(_PRUNE.holdout, "fraction of the calibration rows held out of the search; the best "
                               "--rescore-top candidates and the start points are re-scored on "
                               "them and the best there is chosen (0: choose on search rows)",
                         lo=0.0, hi=0.9)
    rescore_top: int = opt(_PRUNE.rescore_top, "how many of the search's best candidates are re-scored on the "
                              "held-out rows", lo=1)
    holdout_min_rows: int = opt(_PRUNE.holdout_min_rows, "hold out no rows when --holdout would hold "
                                                         "out fewer than N (too few to overrule the "
                                                         "search score)", lo=1)
    seed: int = opt(_SEARCH.seed, "random seed: same inputs and seed give the same result", lo=0,
                    hi=SEED_MAX)
    calib_size: Optional[int] = opt(None, "score on a seeded random subsample of N calibration rows",
                                    lo=1)
    batch_size: int = opt(_PRUNE.batch_size, "evaluation batch size", lo=1)
    max_length: int = opt(_PRUNE.max_length, "text evaluators: maximum tokens per row", lo=1)
    autocast: str = opt("off", "bf16: the search's forward passes under bf16 autocast (faster on "
                               "CPUs with AMX/AVX512-BF16 and GPUs)", choices=("off", "bf16"))
    cpu_linear: str = opt(_PRUNE.cpu_linear, "fp32 linear layers of the searches and λ choices on the "
                          "CPU: oneDNN's kernel (~2x MKL's on AMD CPUs) or torch's own", choices=CPU_LINEARS)
    lm_eval_include: Optional[str] = opt(None, "lm-eval: evaluators: folder of local lm-evaluation-harness "
                                               "task YAMLs (also NPS_LM_EVAL_INCLUDE)")
    model_factory: Optional[str] = opt(None, "python:MODULE:FUNCTION building the model for a bare "
                                             "state dict")
    allow_shape_mismatch: bool = opt(False, "treat tensors whose shape differs from the pre-trained "
                                            "model's as task-specific instead of failing")
    running_stats: str = opt("finetuned", "BatchNorm running_mean/running_var: keep the fine-tuned "
                                          "model's whole, as task-specific tensors (a variance that "
                                          "is pruned or rescaled goes negative), or prune them as "
                                          "weights", choices=("finetuned", "prune"))
    executor: str = opt(_PRUNE.executor, "where candidates are scored", choices=executors)
    workers: Optional[int] = opt(None, "parallel workers for the processes/ray executors", lo=1)
    ray_address: Optional[str] = opt(None, "address of an existing Ray cluster (default: start a "
                                           "local one on loopback)")
    device: str = opt("cpu", "device for the candidate build and evaluation (cpu, cuda)")
    tau_dtype: str = opt("float32", "precision τ is held in (16-bit halves the memory of large models; "
                                    "merge: ties, task-arithmetic, average; computed in float32)",
                         choices=tau_dtypes)
    max_failures: int = opt(_SEARCH.max_failures, "consecutive failed candidates before the search stops", lo=1)
    patience: Optional[int] = opt(_SEARCH.patience, "stop the search once the best calibration score has "
                                  "not improved for N generations (0: never stop early)", lo=0)
    min_gain: Optional[float] = opt(_SEARCH.min_gain, "--patience: count only gains of the best calibration "
                                    "score of more than this (score units; 0: any gain)", lo=0.0)
    min_generations: int = opt(_SEARCH.min_generations, "--patience stops the search no earlier than this "
                               "generation", lo=0)
    patience_gap: Optional[float] = opt(_SEARCH.patience_gap, "--patience stops only a search within this "
                                        "of the fine-tuned model's own calibration score (< 0: off)")
    race: Optional[str] = opt(_SEARCH.race, "race each CMA-ES generation over the calibration "
                                            "rows (successive halving): score all candidates on "
                                            "a few seeded rows, carry only those that can still "
                                            "win to more rows; the winners get every row (auto: "
                                            "where rows are scored, >= min-rows x eta^2 of them)",
                              choices=RACES + (RACE_OFF,))
    race_min_rows: int = opt(_SEARCH.race_min_rows, "--race: rows of the first stage", lo=2)
    race_eta: float = opt(_SEARCH.race_eta, "--race: each stage keeps the top 1/ETA of the "
                                            "candidates, and the next has ETA times the rows",
                          lo=1.0, lo_open=True)
    race_z: float = opt(_SEARCH.race_z, "--race: also keep a candidate within Z standard errors "
                                        "(paired, per row) of the stage's leader", lo=0.0)
    race_gap: Optional[float] = opt(_SEARCH.race_gap, "--race only within this of the fine-tuned "
                                    "model's own calibration score (< 0: always)")
    refine_gap: Optional[float] = opt(_SEARCH.refine_gap, "refine the rescale in generation 0 only "
                                      "more than this below the fine-tuned model's score (< 0: always)")
    resume: bool = opt(False, "continue a killed search from its log next to the output")
    quiet: bool = opt(False, "no progress bars")


@dataclass
class PruneOptions(SearchOptions):
    pretrained: str = opt(None, "pre-trained model folder, .safetensors or .gguf file", positional=True)
    finetuned: str = opt(None, "fine-tuned model folder, .safetensors or .gguf file, or a LoRA adapter folder", positional=True)
    output: str = opt(None, "output folder", short="-o", required=True)
    eval: Optional[str] = opt(None, "calibration evaluator SPEC (needed by --method nps)")
    test: Optional[str] = opt(None, "held-out evaluator SPEC scored once at the end")
    method: str = opt("nps", "pruning method", choices=lambda: ("nps",) + pruners())


@dataclass
class TransferOptions(SearchOptions):
    pretrained: str = opt(None, "pre-trained model folder, .safetensors or .gguf file", positional=True)
    finetuned: str = opt(None, "fine-tuned model folder, .safetensors or .gguf file, or a LoRA adapter folder", positional=True)
    output: str = opt(None, "output folder", short="-o", required=True)
    eval_source: str = opt(None, "evaluator SPEC of the original (pre-trained) ability", required=True)
    eval_target: str = opt(None, "evaluator SPEC of the new task (also NPS's calibration data)",
                           required=True)
    method: str = opt("nps", "how the task vector is pruned",
                      choices=lambda: ("nps",) + pruners() + ("none",))
    lambdas: List[float] = opt([0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.5, 2.0], "grid of λ tried",
                               flag="--lambdas", many=True)


@dataclass
class MergeOptions(SearchOptions):
    pretrained: str = opt(None, "pre-trained model folder, .safetensors or .gguf file", positional=True)
    finetuned: List[str] = opt([], "fine-tuned models (folders, .safetensors, .gguf, LoRA adapters), one per task", positional=True, many=True)
    output: str = opt(None, "output folder", short="-o", required=True)
    method: str = opt("nps", "merge method", choices=lambda: ("nps",) + mergers())
    eval: List[str] = opt([], "one calibration evaluator SPEC per task, in the order of the models",
                          many=True)
    test: List[str] = opt([], "one held-out evaluator SPEC per task, scored once at the end", many=True)
    lam: Optional[float] = opt(None, "fixed scaling λ: merge without any evaluator", flag="--lambda")
    normalize: str = opt("mask-count", "NPS merge: divide Σλ_i·τ̂_i by the per-entry mask count, Σλ_i, "
                                       "or nothing", choices=normalizations)
    lambda_grid: List[float] = opt([0.8, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.2, 2.5],
                                   "grid of single λ tried before the per-task search", many=True)
    lambda_generations: int = opt(10, "CMA-ES generations of the per-task λ search", lo=0)
    joint_generations: int = opt(0, "nps: then CMA-ES generations of the merge-aware search (every task's "
                                    "point and λ_i together on the merged model's mean calibration "
                                    "score, from the two-stage result; 0: the paper's two stages)", lo=0)
    combine: str = opt("best", "nps merge: write the best on calibration of Eq. 7 on the slim vectors and "
                               "TSV-M and Iso-C on the slim and on the dense ones (best), or Eq. 7 "
                               "(nps: λ grid, then per-task λ; what a fixed --lambda or "
                               "--joint-generations always use)", choices=("best", "nps"))
    # the merge options (core.merge.MERGE_OPTIONS: values and default; the mergers' signatures
    # say which method takes which); --svd-matrices is the option `matrices`
    collide: str = opt(_MERGE.collide, "masks that do not collide: leave each entry to one task only, the one of "
                                       "largest |value| (magnitude) or the first in order (nps, ties, "
                                       "dare-linear, dare-ties, della)", choices=merge_option("collide"))
    trim: str = opt(_MERGE.trim, "ties: keep each task's global top-k, each tensor's top-k (layer: "
                                 "balanced across layers), or CABS' conflict-free sequential top-k",
                    choices=merge_option("trim"))
    svd_matrices: str = opt(_MERGE.matrices, "tsv-m, iso-c: SVD-merge the 2-D tensors (published; the rest "
                                             "averaged) or every 2+-D tensor as (rows, rest)",
                            choices=merge_option("matrices"))
    names: List[str] = opt([], "task names (default: each fine-tuned folder's name)", many=True)
    prune: Optional[str] = opt(None, "slim each task vector with this pruner at --keep first (nps: "
                                     "its own search on the task's --eval), then merge the slim "
                                     "vectors with --method (not nps, which prunes with NPS itself)",
                               choices=lambda: ("nps",) + pruners())


@dataclass
class CompressOptions(SearchOptions):
    pretrained: str = opt(None, "pre-trained model folder, .safetensors or .gguf file", positional=True)
    finetuned: List[str] = opt([], "fine-tuned models (folders, .safetensors, .gguf, LoRA adapters), one per task", positional=True, many=True)
    output: str = opt(None, "store folder", short="-o", required=True)
    method: str = opt("nps", "pruning method", choices=lambda: ("nps",) + pruners())
    eval: List[str] = opt([], "one calibration evaluator SPEC per task (needed by nps)", many=True)
    values: str = opt("fp32", "coding of the stored values: fp32|fp16|bf16, a k-bit codebook per tensor "
                      "(q2|q3|q4|q8), sign + one scale per tensor (sign), or sign + 4 magnitude levels "
                      "(sign-q2)", choices=value_dtypes)
    mask: str = opt("packed", "mask coding: 1-bit packed, entropy-coded, or seeded", choices=mask_codings)
    tune_levels: int = opt(0, "quantized --values: CMA-ES generations tuning one factor per level "
                              "index on each task's --eval data (0: the least-squares levels)", lo=0)
    reference_pretrained: bool = opt(False, "store a reference (path + checksum) to the pre-trained "
                                            "model instead of a copy")
    names: List[str] = opt([], "task names (default: each fine-tuned folder's name)", many=True)


@dataclass
class RestoreOptions:
    store: str = opt(None, "store folder", positional=True)
    task: str = opt(None, "task name", positional=True)
    output: str = opt(None, "output model folder", short="-o", required=True)
    pretrained: Optional[str] = opt(None, "pre-trained model (needed when the store only references it)")


@dataclass
class InfoOptions:
    store: str = opt(None, "store folder", positional=True)
    json: bool = opt(False, "print one JSON object")
    verify: bool = opt(False, "also check every part's sha256 and decode every task (reads it all)")


@dataclass
class EvalOptions:
    model: str = opt(None, "model folder, .safetensors file, GGUF file or LoRA adapter folder",
                     positional=True)
    pretrained: Optional[str] = opt(None, "the base model (folder or GGUF file) a LoRA adapter MODEL "
                                          "applies to (default: its base_model_name_or_path)")
    eval: str = opt(None, "evaluator SPEC", required=True)
    json: bool = opt(False, "print one JSON object with at least `score`")
    calib_size: Optional[int] = opt(None, "score a seeded random subsample of N rows", lo=1)
    seed: int = opt(0, "seed of the subsample", lo=0, hi=SEED_MAX)
    batch_size: int = opt(_PRUNE.batch_size, "evaluation batch size", lo=1)
    max_length: int = opt(_PRUNE.max_length, "text evaluators: maximum tokens per row", lo=1)
    lm_eval_include: Optional[str] = opt(None, "lm-eval: evaluators: folder of local lm-evaluation-harness "
                                               "task YAMLs (also NPS_LM_EVAL_INCLUDE)")
    model_factory: Optional[str] = opt(None, "python:MODULE:FUNCTION building the model for a bare "
                                             "state dict")


@dataclass
class DemoOptions:
    quick: bool = opt(False, "a CI-sized smoke run (tiny splits, few generations)")
    output: str = opt("runs/demo", "where the demo writes its models and reports", short="-o")


COMMANDS: Dict[str, Type] = {
    "prune": PruneOptions, "transfer": TransferOptions, "merge": MergeOptions,
    "compress": CompressOptions, "restore": RestoreOptions, "info": InfoOptions,
    "eval": EvalOptions, "demo": DemoOptions,
}

# -- CLI flags from fields -----------------------------------------------------------------------

def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _base_type(f: dataclasses.Field):
    t = f.type if not isinstance(f.type, str) else f.type
    s = str(t)
    if "float" in s:
        return float
    if "int" in s:
        return int
    return str


def add_arguments(parser: argparse.ArgumentParser, cls: Type) -> None:
    """Add one argparse argument per field of ``cls``. Values stay strings here: :func:`build`
    converts and validates them, the same code as for YAML (one message format for both)."""
    for f in dataclasses.fields(cls):
        m = f.metadata
        help_text = m.get("help", "")
        metavar = f.name.upper()
        if m.get("positional"):
            parser.add_argument(f.name, nargs="+" if m.get("many") else None, help=help_text)
            continue
        names = [_flag(f)] + ([m["short"]] if m.get("short") else [])
        if "bool" in str(f.type):
            parser.add_argument(*names, dest=f.name, action="store_true", default=None, help=help_text)
            continue
        if m.get("choices"):
            help_text += f" ({'|'.join(map(str, m['choices']))})"
        default = f.default if f.default is not dataclasses.MISSING else None
        if default not in (None, False) and not m.get("many"):
            help_text += f" [default: {default}]"
        if m.get("many"):
            # --eval A --eval B, or --eval A B
            parser.add_argument(*names, dest=f.name, nargs="+", action="extend",
                                default=None, help=help_text, metavar=metavar)
        else:
            parser.add_argument(*names, dest=f.name, default=None, help=help_text, metavar=metavar)


def from_namespace(cls: Type, ns: argparse.Namespace):
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)
              if getattr(ns, f.name, None) is not None}
    return build(cls, values, source="command line")


def build(cls: Type, values: Mapping[str, Any], source: str = "config"):
    """Validate ``values`` (from YAML or the CLI) into ``cls``: unknown keys, types, ranges, choices."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    aliases = {_flag(f).lstrip("-").replace("-", "_"): f.name for f in fields.values()}
    kwargs: Dict[str, Any] = {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise NPSError(f"{source}: option names must be strings, not {short(key)}")
        name = key.replace("-", "_")
        name = name if name in fields else aliases.get(name, name)
        if name not in fields:
            close = difflib.get_close_matches(name, sorted(fields), n=3, cutoff=0.6)
            hint = (f"did you mean {', '.join(close)}?" if close else
                    f"{len(fields)} options: `nps COMMAND --help` lists them")
            raise NPSError(f"{source}: unknown option {short(key)} ({hint})")
        kwargs[name] = _coerce(fields[name], value, source)
    for f in fields.values():
        if (f.metadata.get("positional") or f.metadata.get("required")) and kwargs.get(f.name) in (None, []):
            if f.default is dataclasses.MISSING or f.default is None or f.metadata.get("many"):
                raise NPSError(f"{source}: option {f.name!r} is required")
    return cls(**kwargs)


def _coerce(f: dataclasses.Field, value: Any, source: str):
    if f.metadata.get("many"):
        items = value if isinstance(value, (list, tuple)) else [value]
        return [_coerce_one(f, v, source) for v in items]
    if value is None:
        return None
    return _coerce_one(f, value, source)


def _coerce_one(f: dataclasses.Field, value: Any, source: str):
    """The one validation of every option value (CLI and YAML alike): type, finiteness of every
    float, integer range, choices, the field's bounds."""
    m, name, s = f.metadata, f.name, str(f.type)
    try:
        if "bool" in s:
            if not isinstance(value, bool):
                raise TypeError
        elif _base_type(f) is float:
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise TypeError
            value = float(value)
        elif _base_type(f) is int:
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise TypeError
            if isinstance(value, float) and not value.is_integer():
                raise TypeError
            value = int(value)
        else:
            if not isinstance(value, (str, Path)):
                raise TypeError
            value = str(value)
    except (TypeError, ValueError, OverflowError):
        raise NPSError(f"{source}: option {name!r} has the wrong type: {short(value)}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise NPSError(f"{source}: option {name!r} must be a finite number, not {value}")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT_MAX:
        raise NPSError(f"{source}: option {name!r} = {short(value)} is out of range (|value| <= 2**63 - 1)")
    if isinstance(value, str) and ("\x00" in value or len(value) > 4096):
        raise NPSError(f"{source}: option {name!r} is not a usable string: {short(value)}")
    if m.get("choices") and value not in m["choices"]:
        raise NPSError(f"{source}: option {name!r} must be one of {', '.join(m['choices'])}, "
                       f"not {short(value)}")
    lo, hi = m.get("lo"), m.get("hi")
    if lo is not None and (value < lo or (m.get("lo_open") and value == lo)):
        raise NPSError(f"{source}: option {name!r} = {short(value)} is out of range "
                       f"({'>' if m.get('lo_open') else '>='} {lo})")
    if hi is not None and value > hi:
        raise NPSError(f"{source}: option {name!r} = {short(value)} is out of range (<= {hi})")
    return value


def load_yaml_config(path: str | Path):
    """Read ``nps run CONFIG.yaml``: returns (command, options)."""
    p = Path(path)
    data = read_yaml(p)
    if not isinstance(data, dict):
        raise NPSError(f"{p}: expected a mapping with a 'command' key")
    command = data.pop("command", None)
    if not isinstance(command, str) or command not in COMMANDS:
        raise NPSError(f"{p}: 'command' must be one of {', '.join(COMMANDS)}, not {short(command)}")
    # Relative paths in a config resolve against the current directory, as on the command line.
    return command, build(COMMANDS[command], data, source=str(p))
