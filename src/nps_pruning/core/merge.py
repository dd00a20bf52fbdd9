"""Merging several task vectors of one pre-trained model (SPEC §2 "Fusion", Eq. 7).

Every merger is a pure function over an ``(N, D)`` matrix of flat task vectors (one row per task,
see :func:`nps_pruning.task_vector.stack_values`) and returns the merged task vector ``(D,)``;
the merged model is ``θ_pre + result``. Signature shared by every entry of :data:`MERGERS`::

    fn(taus, *, lam=1.0, keep_ratio=0.2, seed=0) -> torch.Tensor

Baselines, with their published definitions:

* ``average``          — weight averaging of the fine-tuned models: mean of τ_i (``lam`` ignored);
* ``task-arithmetic``  — Ilharco et al. 2023: ``lam · Σ τ_i``;
* ``ties``             — TIES-Merging, Yadav et al. 2023: trim each τ_i globally to its top-k
  magnitudes, elect a sign per entry (sign of the summed trimmed values), disjoint mean;
* ``dare-linear``      — DARE, Yu et al. 2024: keep exactly k random entries of each τ_i, rescale
  them by D/k (= 1/(1−p)), then ``lam · Σ``;
* ``dare-ties``        — DARE on each τ_i, then TIES' sign election and disjoint mean (no trim);
* ``della``            — DELLA-Merging, Deep et al. 2024: MAGPRUNE (magnitude-aware drop: each
  entry is kept with probability 1 − p_j, p_j linear in its magnitude rank over
  [p − ε/2, p + ε/2] around p = 1 − r, the largest entries dropped least; kept entries rescaled by
  1/(1 − p_j)), then TIES' sign election and disjoint mean; × λ;
* ``tsv-m``, ``iso-c``  — per-matrix SVD merges (TSV-M, CVPR 2025; Iso-C, ICML 2025), in
  :mod:`.merge_svd`; they need the tensors' shapes, which :func:`merge` passes.

NPS-merge itself prunes each τ_i with NPS first and combines the pruned vectors with
:func:`nps_combine` (Eq. 7). The helpers (:func:`trim_top_k`, :func:`dare_drop`,
:func:`elect_sign`, :func:`disjoint_mean`) follow PEFT's ``merge_utils``.
"""
from __future__ import annotations

import inspect
from typing import Callable, Dict, Literal, Optional, Sequence

import torch

from .collide import COLLIDE_RULES, allot, layer_trim, sequential_trim
from .mask import keep_count, topk_mask
from .merge_registry import COLUMN_CHUNK, MERGERS, check_scalar, check_taus, register_merger
from .merge_svd import MATRIX_RULES, iso_c, tsv_m
from .registry import registrar

__all__ = ["MERGERS", "MERGE_OPTIONS", "merger_options", "option_problem", "register_merger", "merge",
           "scales_with_lambda", "magprune", "NORMALIZATIONS", "register_normalization", "nps_combine",
           "trim_top_k", "dare_drop", "elect_sign", "disjoint_mean", "Normalize"]

Normalize = Literal["mask-count", "lambda-sum", "none"]   # the built-in NORMALIZATIONS (below)


# -- building blocks (PEFT merge_utils style) -----------------------------------------------------
def trim_top_k(taus: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """TIES' trim: each row keeps its k = round(r·D) largest magnitudes (over the whole row, not
    per tensor), the rest become 0."""
    check_taus(taus)
    k = keep_count(taus.shape[1], keep_ratio)
    out = torch.zeros_like(taus)
    for i, row in enumerate(taus):
        mask = topk_mask(row.abs(), k)
        out[i, mask] = row[mask]
    return out


def dare_drop(taus: torch.Tensor, keep_ratio: float, seed: int = 0) -> torch.Tensor:
    """DARE (Yu et al. 2024): row i keeps exactly k = round(r·D) entries drawn uniformly at random
    (generator seeded with ``seed + i``) and rescales them by D/k, i.e. 1/(1−p) for drop rate p."""
    check_taus(taus)
    num_entries = taus.shape[1]
    k = keep_count(num_entries, keep_ratio)
    scale = num_entries / k
    out = torch.zeros_like(taus)
    for i, row in enumerate(taus):
        gen = torch.Generator().manual_seed(int(seed) + i)
        kept = torch.randperm(num_entries, generator=gen)[:k].to(taus.device)
        out[i, kept] = row[kept] * scale
    return out


def elect_sign(taus: torch.Tensor) -> torch.Tensor:
    """TIES' sign election: per entry, the sign of the sum of the (trimmed) values, in {−1, 0, +1}.

    An exact zero sum elects 0, so no task agrees and the entry merges to 0 (the TIES reference
    code instead assigns such entries the global majority sign; that only differs on exact
    cancellations)."""
    return torch.sign(taus.sum(dim=0))


def disjoint_mean(taus: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Per entry, the mean over the tasks whose value is nonzero and has the elected sign
    (0 where no task agrees). Computed in slices of :data:`COLUMN_CHUNK` entries (each entry is
    its own column, so the result is the same), so its temporaries are a slice's, not (N, D)'s."""
    out = torch.empty(taus.shape[1], dtype=taus.dtype, device=taus.device)
    for s in range(0, taus.shape[1], COLUMN_CHUNK):
        t, g = taus[:, s:s + COLUMN_CHUNK], sign[s:s + COLUMN_CHUNK]
        agree = (torch.sign(t) == g) & (t != 0)
        total = torch.where(agree, t, torch.zeros_like(t)).sum(dim=0)
        out[s:s + COLUMN_CHUNK] = total / agree.sum(dim=0).clamp(min=1)
    return out


# -- the registered mergers -------------------------------------------------------------------------
@register_merger("average")
def average(taus: torch.Tensor, *, lam: float = 1.0, keep_ratio: float = 0.2,
            seed: int = 0) -> torch.Tensor:
    """Weight averaging: θ_pre + mean_i τ_i is the mean of the fine-tuned models (``lam`` ignored)."""
    check_taus(taus)
    if _half(taus):
        return _by_columns(taus, lambda t: t.mean(dim=0))
    return taus.mean(dim=0)


@register_merger("task-arithmetic")
def task_arithmetic(taus: torch.Tensor, *, lam: float = 1.0, keep_ratio: float = 0.2,
                    seed: int = 0) -> torch.Tensor:
    """Task Arithmetic (Ilharco et al. 2023): λ · Σ_i τ_i."""
    check_taus(taus)
    lam = check_scalar("lam", lam)
    if _half(taus):
        return _by_columns(taus, lambda t: t.sum(dim=0)).mul_(lam)
    return lam * taus.sum(dim=0)


def _half(taus: torch.Tensor) -> bool:
    return taus.dtype in (torch.float16, torch.bfloat16)


def _by_columns(taus: torch.Tensor, fn) -> torch.Tensor:
    """``fn`` of each column slice of 16-bit ``taus`` computed in float32: a float32 result with
    no float32 copy of the (N, D) matrix."""
    out = torch.empty(taus.shape[1], dtype=torch.float32, device=taus.device)
    for s in range(0, taus.shape[1], COLUMN_CHUNK):
        out[s:s + COLUMN_CHUNK] = fn(taus[:, s:s + COLUMN_CHUNK].float())
    return out


# the mergers that take 16-bit task vectors (computed in float32 slice by slice, float32 out)
HALF_MERGERS = ("average", "task-arithmetic", "ties")


TRIMS = ("global", "layer", "sequential")   # TIES' trim: one top-k per task / per tensor / CABS


@register_merger("ties")
def ties(taus: torch.Tensor, *, lam: float = 1.0, keep_ratio: float = 0.2,
         seed: int = 0, collide: str = "allow", trim: str = "global", shapes=None) -> torch.Tensor:
    """TIES-Merging (Yadav et al. 2023): trim (global top-k per task), elect sign, disjoint mean; × λ.

    ``trim="layer"``: the top-k of each tensor instead (:func:`.collide.layer_trim`, needs
    ``shapes``); ``trim="sequential"``: CABS' conflict-free trim (:func:`.collide.sequential_trim`).
    ``collide``: :func:`.collide.allot` on the trimmed vectors."""
    lam = check_scalar("lam", lam)
    if trim not in TRIMS:
        raise ValueError(f"trim must be one of {', '.join(TRIMS)}, got {trim!r}")
    if trim == "global" and collide == "allow":
        return ties_global(taus, keep_ratio).mul_(lam)
    if _half(taus):
        raise ValueError("16-bit task vectors: ties takes them with the global trim and collide "
                         "'allow' only")
    trimmed = (trim_top_k(taus, keep_ratio) if trim == "global" else
               layer_trim(taus, keep_ratio, shapes) if trim == "layer" else
               sequential_trim(taus, keep_ratio))
    trimmed = allot(trimmed, collide)
    return lam * disjoint_mean(trimmed, elect_sign(trimmed))


def ties_global(taus: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """TIES (global trim, no λ) with the trimmed rows held as masks, one byte an entry per task,
    not as an (N, D) float copy: :func:`trim_top_k`, :func:`elect_sign` and :func:`disjoint_mean`
    computed column slice by column slice (each entry is its own column), bit for bit."""
    check_taus(taus)
    n, d = taus.shape
    k = keep_count(d, keep_ratio)
    up = (lambda t: t.float()) if _half(taus) else (lambda t: t)     # 16-bit τ: computed in float32
    masks = torch.empty((n, d), dtype=torch.bool, device=taus.device)
    for i, row in enumerate(taus):
        masks[i] = topk_mask(up(row).abs(), k)
    out = torch.empty(d, dtype=torch.float32 if _half(taus) else taus.dtype, device=taus.device)
    for s in range(0, d, COLUMN_CHUNK):       # one slice of the trimmed rows at a time
        t = torch.where(masks[:, s:s + COLUMN_CHUNK], up(taus[:, s:s + COLUMN_CHUNK]), 0.0)
        out[s:s + COLUMN_CHUNK] = disjoint_mean(t, elect_sign(t))
    return out


@register_merger("dare-linear")
def dare_linear(taus: torch.Tensor, *, lam: float = 1.0, keep_ratio: float = 0.2,
                seed: int = 0, collide: str = "allow") -> torch.Tensor:
    """DARE then Task Arithmetic: λ · Σ_i DARE(τ_i) (``collide``: on the dropped vectors)."""
    lam = check_scalar("lam", lam)
    return lam * allot(dare_drop(taus, keep_ratio, seed), collide).sum(dim=0)


@register_merger("dare-ties")
def dare_ties(taus: torch.Tensor, *, lam: float = 1.0, keep_ratio: float = 0.2,
              seed: int = 0, collide: str = "allow") -> torch.Tensor:
    """DARE then TIES' sign election and disjoint mean (DARE replaces the trim); × λ."""
    lam = check_scalar("lam", lam)
    dropped = allot(dare_drop(taus, keep_ratio, seed), collide)
    return lam * disjoint_mean(dropped, elect_sign(dropped))


DELLA_EPSILON = 0.1      # DELLA's ε: the spread of the drop probabilities around p = 1 − r


def magprune(taus: torch.Tensor, keep_ratio: float, seed: int = 0,
             epsilon: float = DELLA_EPSILON) -> torch.Tensor:
    """DELLA's MAGPRUNE on each row: drop probability p_j = p + ε/2 − ε·rank_j/(D − 1) with rank 0
    the smallest magnitude (p = 1 − keep_ratio; ε shrunk to 2·min(p, 1 − p) so every p_j lies in
    [0, 1]); entry j kept independently (generator seeded with ``seed + i``) and rescaled by
    1/(1 − p_j). The expected kept count is r·D (not exact, unlike :func:`dare_drop`)."""
    check_taus(taus)
    p = 1.0 - float(keep_ratio)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    eps = min(float(epsilon), 2 * min(p, 1 - p))
    num_entries = taus.shape[1]
    out = torch.zeros_like(taus)
    for i, row in enumerate(taus):
        ranks = torch.empty(num_entries, dtype=torch.float64, device=taus.device)
        ranks[torch.argsort(row.abs(), stable=True)] = torch.arange(
            num_entries, dtype=torch.float64, device=taus.device)
        drop = p + eps / 2 - eps * ranks / max(num_entries - 1, 1)
        keep_prob = 1.0 - drop
        gen = torch.Generator().manual_seed(int(seed) + i)
        u = torch.rand(num_entries, generator=gen, dtype=torch.float64).to(taus.device)
        kept = u < keep_prob
        out[i, kept] = (row[kept].double() / keep_prob[kept]).to(taus.dtype)
    return out


@register_merger("della")
def della(taus: torch.Tensor, *, lam: float = 1.0, keep_ratio: float = 0.2,
          seed: int = 0, collide: str = "allow") -> torch.Tensor:
    """DELLA-Merging (Deep et al. 2024): MAGPRUNE, elect sign, disjoint mean; × λ."""
    lam = check_scalar("lam", lam)
    dropped = allot(magprune(taus, keep_ratio, seed), collide)
    return lam * disjoint_mean(dropped, elect_sign(dropped))


# the per-matrix SVD merges (:mod:`.merge_svd`), which need the tensors' shapes
register_merger("tsv-m")(tsv_m)
register_merger("iso-c")(iso_c)
tsv_m.needs_shapes = iso_c.needs_shapes = True
for _name in ("task-arithmetic", "ties", "dare-linear", "dare-ties", "della", "tsv-m", "iso-c"):
    MERGERS[_name].scales_with_lambda = True       # each returns λ · (a λ-free merge)


# The options a merger may take beyond (taus, lam, keep_ratio, seed), declared once: each one's
# values, the first its default (under which every merger behaves as if it did not exist). A
# merger takes an option when its signature names it (:func:`merger_options`); :func:`merge`,
# ``MergeSettings`` and the CLI's flags and checks all read this table.
MERGE_OPTIONS = {
    "collide": COLLIDE_RULES,    # masks that do not collide (.collide.allot): mergers that sparsify
    "trim": TRIMS,               # TIES' trim: one top-k per task / per tensor / CABS' sequential
    "matrices": MATRIX_RULES,    # the SVD merges: which tensors are matrices (.merge_svd)
}


def merge(method: str, taus: torch.Tensor, *, lam: float = 1.0, keep_ratio: float = 0.2,
          seed: int = 0, shapes=None, collide: str = "allow", trim: str = "global",
          matrices: str = "2d") -> torch.Tensor:
    """``MERGERS[method]`` on ``taus``; ``shapes`` (the layout's tensor shapes) goes to the mergers
    that need them (``needs_shapes``: the per-matrix SVD merges; TIES with ``trim="layer"``).
    ``collide`` (masks that do not collide, :mod:`.collide`) applies to the mergers that sparsify
    each τ_i (ties, dare-linear, dare-ties, della), ``trim`` to TIES only, ``matrices`` (which
    tensors are matrices: :data:`.merge_svd.MATRIX_RULES`) to the SVD merges only."""
    fn = MERGERS[method]
    problem = option_problem(method, collide, trim)
    if problem:
        raise ValueError(problem)
    given = {"collide": collide, "trim": trim, "matrices": matrices}
    extra = {name: given[name] for name in merger_options(method) if given[name] != MERGE_OPTIONS[name][0]
             or name == "matrices"}
    if needs_shapes(method) or trim != "global":      # TIES' per-tensor trim reads them too
        extra["shapes"] = shapes
    return fn(taus, lam=lam, keep_ratio=keep_ratio, seed=seed, **extra)


def merger_options(method: str) -> tuple:
    """The :data:`MERGE_OPTIONS` merge ``method`` takes: those its function's signature names (as
    mergekit reads a merge method's parameters from its signature); "nps" (NPS-merge,
    :func:`nps_combine`) takes ``collide``."""
    if method == "nps":
        return ("collide",)
    params = inspect.signature(MERGERS[method]).parameters
    return tuple(name for name in MERGE_OPTIONS if name in params)


def option_problem(method: str, collide: str = "allow", trim: str = "global",
                   flag=lambda name: name, matrices: str = "2d") -> Optional[str]:
    """Why an option given a value other than its default does not apply to merge ``method``
    (None when every one does: :func:`merger_options`). ``flag`` names an option in the message
    (the CLI: its flag)."""
    given = {"collide": collide, "trim": trim, "matrices": matrices}
    for name, value in given.items():
        if value == MERGE_OPTIONS[name][0] or name in merger_options(method):
            continue
        takers = [m for m in ("nps", *MERGERS) if name in merger_options(m)]
        if name == "collide":
            return (f"{flag('collide')} {collide}: {flag('method')} {method} keeps every entry of every "
                    f"task; masks that do not collide apply to {', '.join(takers[:-1])} and {takers[-1]}")
        return (f"{flag(name)} {value} applies to {flag('method')} {' and '.join(takers)} only"
                if len(takers) < 3 else f"{flag(name)} {value} applies to {', '.join(takers)}, not {method}")
    return None


def scales_with_lambda(method: str) -> bool:
    """Whether ``MERGERS[method]`` at λ is bit for bit λ times itself at λ = 1 (it returns
    ``λ · X`` with X free of λ), so a λ grid merges once and scales: a merger says so with
    ``scales_with_lambda = True`` (every one here but ``average``, which ignores λ; a test holds
    each one that says so to it); a merger registered without it is built at every λ."""
    return bool(getattr(MERGERS[method], "scales_with_lambda", False))


def needs_shapes(method: str) -> bool:
    """Whether ``MERGERS[method]`` works per tensor and so needs the layout's shapes."""
    return bool(getattr(MERGERS[method], "needs_shapes", False))


# -- NPS-merge (Eq. 7) --------------------------------------------------------------------------------
def nps_combine(pruned: torch.Tensor, lambdas: Sequence[float],
                normalize: Normalize = "mask-count", collide: str = "allow") -> torch.Tensor:
    """Eq. 7: Σ_i λ_i · τ̂_i / n over NPS-pruned task vectors ``pruned`` (N, D).

    ``normalize`` chooses n (SPEC §2 "Fusion"):

    * ``"mask-count"``: per entry, the number of tasks whose τ̂_i is nonzero there (1 where none)
      — the authors' earlier code;
    * ``"lambda-sum"``: n = Σ_i λ_i — the paper's literal formula;
    * ``"none"``: n = 1.

    ``collide`` ≠ "allow": each entry is first left to one task only (:func:`.collide.allot`).
    """
    check_taus(pruned)
    pruned = allot(pruned, collide)
    lambdas = [check_scalar("lambda", lam) for lam in lambdas]
    if len(lambdas) != pruned.shape[0]:
        raise ValueError(f"got {len(lambdas)} lambdas for {pruned.shape[0]} task vectors")
    weights = torch.tensor(lambdas, dtype=pruned.dtype, device=pruned.device)
    total = (weights[:, None] * pruned).sum(dim=0)
    if normalize not in NORMALIZATIONS:
        names = [f"'{n}'" for n in NORMALIZATIONS]
        listed = ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]
        raise ValueError(f"normalize must be {listed}, got {normalize!r}")
    return NORMALIZATIONS[normalize](total, pruned, lambdas)


# The n of Eq. 7 by name (``nps merge --normalize``): ``fn(total, pruned, lambdas) -> total / n``,
# ``total`` = Σ_i λ_i·τ̂_i.
Normalization = Callable[[torch.Tensor, torch.Tensor, Sequence[float]], torch.Tensor]
NORMALIZATIONS: Dict[str, Normalization] = {}


register_normalization = registrar(NORMALIZATIONS, "normalization",
                                   "Decorator adding an NPS-merge normalization to "
                                   ":data:`NORMALIZATIONS` (names are unique).")


@register_normalization("mask-count")
def _by_mask_count(total: torch.Tensor, pruned: torch.Tensor, lambdas) -> torch.Tensor:
    return total / (pruned != 0).sum(dim=0).clamp(min=1).to(pruned.dtype)


@register_normalization("lambda-sum")
def _by_lambda_sum(total: torch.Tensor, pruned: torch.Tensor, lambdas) -> torch.Tensor:
    lambda_sum = sum(lambdas)
    if lambda_sum == 0:
        raise ValueError("normalize='lambda-sum' needs lambdas that do not sum to 0")
    return total / lambda_sum


@register_normalization("none")
def _unnormalized(total: torch.Tensor, pruned: torch.Tensor, lambdas) -> torch.Tensor:
    return total

