"""Merging (Eq. 7 and the baselines): several fine-tuned models of one pre-trained model → one.

Output layout: the merged body is shared, but each task keeps its own task-specific tensors (its
classification head), so the output holds one loadable model folder per task::

    OUT/report.json            settings, λ, every score
    OUT/merged_task_vector.safetensors   the merged τ (prunable tensors only)
    OUT/<task>/                a `from_pretrained` folder: merged body + that task's head

Where a task's folder would hold the same weights as the first task's (no head of its own: the
causal LMs), its weight files are hard links of the first folder's, so N tasks cost one model on
disk (``report.json["weights_shared_with_first"]`` names them; written in full where the
filesystem has no hard links).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Sequence

import numpy as np
import torch

from ..core.joint_space import JointSpace
from ..core.merge import merge, needs_shapes, nps_combine, scales_with_lambda
from ..core.space import make_space
from ..errors import NPSError
from ..paths import check_name
from ..search import SearchSettings, run_search
from ..search.cpu_linear import linear_mode
from ..search.grid import grid_search
from .prune import Session
from .settings import MergeSettings

# files `nps merge` writes next to the task folders (a task may not be named like one)
MERGE_OUTPUT_FILES = ("report.json", "merged_task_vector.safetensors", ".nps-output")


def task_names(paths: Sequence[str], names: Sequence[str], *,
               reserved: Sequence[str] = ()) -> List[str]:
    """One name per model: ``--names`` or each folder's name. A name becomes a folder (merge) and
    a search log name, so it must be one plain path component and not a name in ``reserved``."""
    if names:
        if len(names) != len(paths):
            raise NPSError(f"--names gives {len(names)} names for {len(paths)} models")
        out = list(names)
        what = "--names"
    else:
        out = [Path(p).stem if Path(p).is_file() else Path(p).resolve().name for p in paths]
        what = "task name (from the model's folder name; pass --names)"
    for name in out:
        check_name(name, what=what, reserved=reserved)
    folded = [n.casefold() for n in out]
    if len(set(folded)) != len(folded):
        raise NPSError(f"task names are not unique: {out}; pass --names")
    return out


def merged_scores(sessions: Sequence[Session], evaluators: Sequence[Callable],
                  merged: torch.Tensor, cpu_linear: str = "torch") -> List[float]:
    """Each task's score of θ_pre + merged τ with that task's own head; ``cpu_linear``: the CPU
    kernel of the fp32 linear layers (:mod:`~nps_pruning.search.cpu_linear`; the merges' choices
    pass their settings', a test score keeps torch's)."""
    with linear_mode(cpu_linear, getattr(sessions[0], "device", "cpu") if sessions else "cpu"):
        return [s.score(ev, merged) for s, ev in zip(sessions, evaluators)]


def nps_merge_lambdas(sessions, evaluators, pruned: torch.Tensor, *,
                      settings: MergeSettings = MergeSettings(), progress=True):
    """λ for Eq. 7: the best single λ of ``settings.lambda_grid``, then CMA-ES over per-task λ_i
    started from it (parametrised as λ_i = λ*·w_i so that w = 1 is the grid's best and is always
    scored). Returns (λ_i, grid rows, the CMA-ES SearchResult or None)."""
    n = len(sessions)
    lambda_grid = list(settings.lambda_grid)

    def mean_score(lambdas) -> float:
        return float(np.mean(merged_scores(sessions, evaluators,
                                           nps_combine(pruned, list(lambdas), settings.normalize,
                                                       settings.collide), settings.cpu_linear)))

    choice = grid_search(lambda_grid, lambda lam: mean_score([lam] * n), what="lambda_grid")
    grid = [{"lambda": lam, "score": score} for lam, score in zip(lambda_grid, choice.scores)]
    lam_star = choice.value
    result = None
    lambdas = [lam_star] * n
    if settings.lambda_generations > 0 and n > 1:
        def scorer(w):
            t0 = time.perf_counter()
            return mean_score(lam_star * np.asarray(w)), {"build_s": 0.0, "eval_s": time.perf_counter() - t0}
        upper = max(lambda_grid) * 1.5 / lam_star
        # the per-task λ search: a plain box over λ_i/λ* (the "magnitude" space: one weight per
        # task, no extra coordinates), not the band-weight search's defaults
        search = SearchSettings(generations=settings.lambda_generations, sigma0=0.2, lower=0.0,
                                upper=upper, seed=settings.seed, max_failures=settings.max_failures,
                                space="magnitude")
        result = run_search(scorer, n, search, progress=progress)
        lambdas = [lam_star * float(w) for w in result.best_weights]
    return lambdas, grid, result


@dataclass
class TaskPoint:
    """One task's NPS result as the merge-aware search needs it: its search space (with the
    bounds the joint search moves in), the prepared τ it decodes in
    (:class:`~nps_pruning.core.prepared.Prepared`: domain, bands, hybrid index, keep ratio) and
    the chosen point (parameter units)."""

    space: Any
    prepared: Any
    params: np.ndarray


def task_point(session: Session, outcome, settings) -> TaskPoint:
    """The :class:`TaskPoint` of a per-task NPS outcome (``settings``: its PruneSettings): the
    prepared τ rebuilt from the settings (deterministic: the very bands and seeded order the
    search decoded with; a prune frees them once its τ̂ is built)."""
    search = settings.search
    space = make_space(outcome.space, settings.bands, search.lower, search.upper, search.param,
                       keep_ratio=outcome.keep_ratio)
    return TaskPoint(space, session.prepared(settings.replace(keep_ratio=outcome.keep_ratio)),
                     np.asarray(outcome.search.best_weights, dtype=np.float64))


def joint_nps_merge(sessions, evaluators, points: Sequence[TaskPoint], lambdas0: Sequence[float], *,
                    settings: MergeSettings = MergeSettings(), sigma0: float = 0.15,
                    popsize=None, log_path=None, progress=True):
    """Merge-aware NPS: CMA-ES over every task's search-space point and the λ_i together
    (:class:`~nps_pruning.core.joint_space.JointSpace`), each candidate scored as the merged model's
    mean calibration score over the tasks (``evaluators``: any fitness), for
    ``settings.joint_generations`` generations, started from the two-stage result (``points``,
    ``lambdas0``), which generation 0 scores: the result is never worse than it on this score.
    ``sigma0``: the initial step in search coordinates (a local refinement). Returns
    (pruned (N, D), λ_i, the SearchResult)."""
    space = JointSpace([p.space for p in points], [p.params for p in points], lambdas0)

    def build(params):
        per_task, lambdas = space.unpack(params)
        pruned = torch.stack([p.prepared.build(w) for p, w in zip(points, per_task)])
        return pruned, [float(v) for v in lambdas]

    def scorer(params):
        t0 = time.perf_counter()
        pruned, lambdas = build(params)
        merged = nps_combine(pruned, lambdas, settings.normalize, settings.collide)
        t1 = time.perf_counter()
        score = float(np.mean(merged_scores(sessions, evaluators, merged, settings.cpu_linear)))
        return score, {"build_s": t1 - t0, "eval_s": time.perf_counter() - t1, "examples": rows}

    rows = sum(int(getattr(ev, "num_rows", 0) or 0) for ev in evaluators)   # per candidate

    search = SearchSettings(generations=int(settings.joint_generations), sigma0=float(sigma0),
                            seed=settings.seed, max_failures=settings.max_failures, space="joint",
                            popsize=popsize)
    result = run_search(scorer, space.dim, search, space=space, log_path=log_path, progress=progress)
    pruned, lambdas = build(result.best_weights)
    return pruned, lambdas, result


def merge_with_lambda_grid(method: str, taus: torch.Tensor, sessions, evaluators, *,
                           settings: MergeSettings = MergeSettings()):
    """Merge ``taus`` with ``core.merge.MERGERS[method]`` at the λ of ``settings.lambda_grid``
    whose merged model scores best (weight averaging has no λ). Returns (merged τ, λ, grid rows)."""
    wants_shapes = needs_shapes(method) or settings.trim == "layer"     # TIES' per-tensor trim
    shapes = sessions[0].task_vector.layout.shapes if wants_shapes and sessions else None
    if method == "average":
        merged = merge(method, taus, lam=1.0, keep_ratio=settings.keep_ratio, seed=settings.seed)
        return merged, None, []

    def build(lam):
        return merge(method, taus, lam=lam, keep_ratio=settings.keep_ratio, seed=settings.seed,
                     shapes=shapes, collide=settings.collide, trim=settings.trim, matrices=settings.matrices)

    unit = []                 # the merge at λ = 1, built once when λ only scales it

    def score(lam):           # the best λ's merged τ is kept, not built again
        if scales_with_lambda(method):
            if not unit:
                unit.append(build(1.0))
            merged = float(lam) * unit[0]       # bit for bit the merge at λ (scales_with_lambda)
        else:
            merged = build(lam)
        return float(np.mean(merged_scores(sessions, evaluators, merged, settings.cpu_linear))), merged

    lambda_grid = list(settings.lambda_grid)
    choice = grid_search(lambda_grid, score, what="lambda_grid")
    grid = [{"lambda": lam, "score": s} for lam, s in zip(lambda_grid, choice.scores)]
    return choice.extra, choice.value, grid


# --combine best: the merges tried (inputs, merge), in order (an earlier one wins a tie), and
# the SVD merges' λ
PICKS = (("slim", "nps"), ("slim", "tsv-m"), ("slim", "iso-c"), ("dense", "tsv-m"), ("dense", "iso-c"))
PICK_SVD_GRID = (0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.5, 2.0)


def pick_merge(sessions, evaluators, pruned: torch.Tensor, taus: torch.Tensor, *,
               settings: MergeSettings = MergeSettings(), progress=True):
    """NPS-merge with ``combine="best"``: of the merges :data:`PICKS`, the one whose mean
    calibration score over the tasks is the highest — Eq. 7 on the slim τ̂ (``pruned``; λ grid +
    per-task λ search, exactly ``combine="nps"``), and TSV-M and Iso-C (λ on
    :data:`PICK_SVD_GRID`, ``settings.matrices``) on the slim τ̂ and on the dense τ (``taus``,
    r = 1: where pruning costs the merge more than it saves, the pick says so). An earlier merge
    wins a tie. Returns (merged τ, λ_i, the merges tried as dicts {merge, inputs, score,
    lambdas}, the index of the one picked)."""
    n = len(sessions)
    tried, best = [], None
    for inputs, method in PICKS:
        vecs = pruned if inputs == "slim" else taus
        if method == "nps":
            lambdas, _, _ = nps_merge_lambdas(sessions, evaluators, vecs, settings=settings,
                                              progress=progress)
            merged = nps_combine(vecs, lambdas, settings.normalize, settings.collide)
            score = float(np.mean(merged_scores(sessions, evaluators, merged, settings.cpu_linear)))
        else:
            svd = MergeSettings(lambda_grid=PICK_SVD_GRID, seed=settings.seed, matrices=settings.matrices,
                                cpu_linear=settings.cpu_linear)
            merged, lam, grid = merge_with_lambda_grid(method, vecs, sessions, evaluators, settings=svd)
            lambdas, score = [float(lam)] * n, max(g["score"] for g in grid)
        tried.append({"merge": method, "inputs": inputs, "score": score,
                      "lambdas": [float(x) for x in lambdas]})
        if best is None or score > best[0]:
            best = (score, merged, lambdas, len(tried) - 1)
        del merged
    return best[1], best[2], tried, best[3]


def share_base(sessions: Sequence[Session]) -> None:
    """Let every session use the first one's θ_pre when both read the same pre-trained model in
    the same layout (a merge's tasks always do): the copies they loaded (or took back after a
    search, :meth:`Session.unpark_base`) are freed, so a merge of N tasks holds θ_pre once.
    Compared value for value, so a different base is never shared."""
    first = sessions[0]
    for s in sessions[1:]:
        if (first.base_flat is None or s.base_flat is None or s.base_flat is first.base_flat):
            continue
        if (s.pretrained == first.pretrained and s.task_vector.layout == first.task_vector.layout
                and s.base_flat.dtype == first.base_flat.dtype
                and s.base_flat.device == first.base_flat.device
                and torch.equal(s.base_flat, first.base_flat)):
            s.base_flat = first.base_flat


def share_models(sessions: Sequence[Session]) -> None:
    """Load the scoring model once for all sessions whose models differ only in their prunable
    weights (:meth:`Session.can_share_model`: the causal LMs a merge of LoRA adapters or full
    fine-tunes gives); a session with a head of its own loads its own model."""
    for i, s in enumerate(sessions):
        donor = next((d for d in sessions[:i] if d.model is not None and s.can_share_model(d)), None)
        if donor is not None:
            s.use_model_of(donor)
        else:
            s.ensure_model()


def stack_task_vectors(sessions: Sequence[Session]) -> torch.Tensor:
    """The (N, D) matrix of the sessions' τ, filled row by row; each session's τ then becomes a view
    of its row, so the merge holds the N task vectors once (not once in the sessions and again in
    the matrix) and the copy's peak is one task vector, not N."""
    for s in sessions[1:]:
        sessions[0].task_vector._check_same_layout(s.task_vector)
    v0 = sessions[0].task_vector.values
    taus = torch.empty((len(sessions), v0.numel()), dtype=v0.dtype, device=v0.device)
    del v0
    for i, s in enumerate(sessions):     # no list of the original τ: each is freed once copied
        taus[i].copy_(s.task_vector.values)
        s.task_vector = s.task_vector.with_values(taus[i])   # the session's τ is the row
    return taus


def check_finite_model(base: torch.Tensor, tau: torch.Tensor, what: str,
                       chunk: int = 1 << 24) -> None:
    """Refuse to write θ_pre + τ when an entry is NaN or infinite (an overflowing λ, say): such a
    model would be written with exit 0 and be useless. Checked in chunks (no model-sized copy)."""
    bad = 0
    for s in range(0, tau.numel(), chunk):
        part = base[s:s + chunk].float() + tau[s:s + chunk].float()
        bad += int((~torch.isfinite(part)).sum())
    if bad:
        raise NPSError(f"{what}: {bad:,} of {tau.numel():,} prunable entries are NaN or infinite; "
                       "nothing was written")
