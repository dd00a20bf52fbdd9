"""The library's typed settings: what :func:`~nps_pruning.apps.prune.prune`,
:func:`~nps_pruning.apps.merge.nps_merge_lambdas` / :func:`~nps_pruning.apps.merge.merge_with_lambda_grid`
and :func:`~nps_pruning.apps.transfer.transfer` take instead of the CLI's option objects.

Their defaults are the CLI's (``nps prune`` with no flags prunes with exactly ``PruneSettings()``;
a test holds the two together). The CLI and YAML map their options onto them in one place,
:mod:`nps_pruning.cli.settings`; everything else (the benchmark, the demo, a library caller)
builds them directly::

    settings = PruneSettings(keep_ratio=0.05, search=SearchSettings(generations=10, popsize=8))
    settings = settings.replace(keep_ratio=0.1, generations=20)   # a SearchSettings field goes there

What a :class:`~nps_pruning.apps.session.Session` was loaded with (device, τ dtype, model
factory, running statistics, shape-mismatch handling) is the session's, not a setting.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Tuple

from ..core.merge import MERGE_OPTIONS
from ..errors import NPSError
from ..search.cmaes_search import SearchSettings, shipped_search
from ..search.cpu_linear import check_cpu_linear

__all__ = ["PruneSettings", "MergeSettings", "SearchSettings"]

AUTOCASTS = (None, "bf16")         # PruneSettings.autocast's values (the CLI's --autocast off|bf16)
_SEARCH_FIELDS = tuple(f.name for f in dataclasses.fields(SearchSettings))


@dataclass(frozen=True)
class PruneSettings:
    """How one task vector is pruned (NPS or a baseline) and how candidates are scored.

    ``seed`` is the run's one seed (CMA-ES, the hybrid space's random share, the calibration
    subsample, DARE) and ``space`` the NPS search space; both are also ``search``'s fields, kept
    equal to these: left at None they are read from ``search``, given they replace ``search``'s.
    ``fitness`` None is the evaluator's default fitness (loglik-t; perplexity: loglik; a python:
    evaluator's own score).
    """

    keep_ratio: float = 0.05          # fraction of prunable entries kept (round(keep_ratio*D))
    bands: int = 8                    # magnitude-rank bands M searched by NPS
    scheme: str = "focused"           # where the band cuts go (core.bands SCHEMES)
    focus: float = 3.0                # focused scheme: the first M-1 bands split the top focus*keep
    kept_values: str = "weighted"     # kept entries carry their band weight, or "original" value
    search: SearchSettings = field(default_factory=shipped_search)   # the CMA-ES part
    seed: Optional[int] = None        # None: search.seed
    space: Optional[str] = None       # None: search.space ("hybrid" or "magnitude")
    fitness: Optional[str] = None     # accuracy | loglik | loglik-t | agreement; None: the evaluator's default
    holdout: float = 0.25             # share of calibration rows held out to re-score the best
    rescore_top: int = 5              # how many best candidates are re-scored on the held-out rows
    holdout_min_rows: int = 32        # fewer rows would be held out: no hold-out (session.HOLDOUT_MIN_ROWS)
    calib_size: Optional[int] = None  # score a seeded subsample of this many calibration rows
    batch_size: int = 64
    max_length: int = 128             # text evaluators: maximum tokens per row
    autocast: Optional[str] = None    # "bf16": the search's forward passes under bf16 autocast
    cpu_linear: str = "onednn"        # the search's fp32 linear layers on the CPU: onednn | torch
    executor: str = "serial"          # where candidates are scored: serial | processes | ray
    workers: Optional[int] = None     # processes/ray: how many workers
    ray_address: Optional[str] = None

    def __post_init__(self):
        search = self.search
        if not isinstance(search, SearchSettings):
            raise NPSError(f"settings: search must be a SearchSettings, not {type(search).__name__}")
        seed = search.seed if self.seed is None else int(self.seed)
        space = search.space if self.space is None else self.space
        # a copy of its own (SearchSettings is mutable), its seed and space those of the run
        object.__setattr__(self, "search", dataclasses.replace(search, seed=seed, space=space))
        object.__setattr__(self, "seed", seed)
        object.__setattr__(self, "space", space)
        if not 0.0 < float(self.keep_ratio) <= 1.0:
            raise NPSError(f"settings: keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if not 1 <= int(self.bands) <= 255:
            raise NPSError(f"settings: bands must be in 1..255, got {self.bands}")
        if self.kept_values not in ("weighted", "original"):
            raise NPSError(f"settings: kept_values must be 'weighted' or 'original', got "
                           f"{self.kept_values!r}")
        if not 0.0 <= float(self.holdout) <= 0.9:
            raise NPSError(f"settings: holdout must be in [0, 0.9], got {self.holdout}")
        if int(self.holdout_min_rows) < 1:
            raise NPSError(f"settings: holdout_min_rows must be >= 1, got {self.holdout_min_rows}")
        if int(self.rescore_top) < 1:
            raise NPSError(f"settings: rescore_top must be >= 1, got {self.rescore_top}")
        if self.autocast not in AUTOCASTS:
            raise NPSError(f"settings: autocast must be one of {', '.join(map(str, AUTOCASTS))}, got "
                           f"{self.autocast!r}")
        check_cpu_linear(self.cpu_linear)
        if self.calib_size is not None and int(self.calib_size) < 1:
            raise NPSError(f"settings: calib_size must be >= 1 (or None), got {self.calib_size}")

    def replace(self, **changes) -> "PruneSettings":
        """A copy with ``changes``; the names of :class:`SearchSettings` fields (generations,
        sigma0, lower, upper, popsize, param, max_failures, ...) change ``search``, ``seed`` and
        ``space`` change both."""
        own = {f.name for f in dataclasses.fields(self)}
        to_search = {k: changes.pop(k) for k in list(changes) if k not in own and k in _SEARCH_FIELDS}
        unknown = [k for k in changes if k not in own]
        if unknown:
            raise NPSError(f"settings: unknown setting(s) {', '.join(unknown)} (known: "
                           f"{', '.join(sorted(own | set(_SEARCH_FIELDS)))})")
        search = changes.pop("search", self.search)
        if to_search:
            search = dataclasses.replace(search, **to_search)
        return dataclasses.replace(self, search=search, **changes)

    def evaluator_kwargs(self) -> dict:
        """The keywords of :meth:`Session.evaluator` these settings fix (besides the fitness)."""
        return {"seed": self.seed, "batch_size": self.batch_size, "max_length": self.max_length}


COMBINES = ("best", "nps")   # how NPS-merge combines the slim vectors (see apps.merge.pick_merge)


@dataclass(frozen=True)
class MergeSettings:
    """How λ is chosen for a merge: a grid of one common λ, then (NPS-merge) a CMA-ES search of
    per-task λ_i started from the grid's best."""

    lambda_grid: Tuple[float, ...] = (0.8, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.2, 2.5)
    keep_ratio: float = 0.05          # TIES/DARE-TIES: fraction of each τ kept
    normalize: str = "mask-count"     # NPS-merge: mask-count | lambda-sum | none
    lambda_generations: int = 10      # CMA-ES generations of the per-task λ search (0: grid only)
    seed: int = 0
    max_failures: int = 5
    # the merge options (core.merge.MERGE_OPTIONS: their values, the first the default)
    collide: str = MERGE_OPTIONS["collide"][0]   # core.collide.allot rule on the sparse vectors
    trim: str = MERGE_OPTIONS["trim"][0]         # TIES' trim: global | layer | sequential
    joint_generations: int = 0        # NPS-merge: merge-aware joint search after the two stages
    matrices: str = MERGE_OPTIONS["matrices"][0]   # tsv-m / iso-c: which tensors are matrices
    combine: str = "best"             # NPS-merge: the best merge on calibration (best) | Eq. 7 (nps);
    #                                   a joint search (joint_generations) refines Eq. 7 and implies nps
    cpu_linear: str = "onednn"        # the choices' fp32 CPU linear layers (search.cpu_linear)

    def __post_init__(self):
        object.__setattr__(self, "lambda_grid", tuple(self.lambda_grid))   # as given: the report lists them
        if int(self.lambda_generations) < 0:
            raise NPSError(f"settings: lambda_generations must be >= 0, got {self.lambda_generations}")
        if int(self.joint_generations) < 0:
            raise NPSError(f"settings: joint_generations must be >= 0, got {self.joint_generations}")
        check_cpu_linear(self.cpu_linear)
        if self.combine not in COMBINES:
            raise NPSError(f"settings: combine must be one of {', '.join(COMBINES)}, got {self.combine!r}")
        for name, values in MERGE_OPTIONS.items():     # collide, trim, matrices: declared in core.merge
            if getattr(self, name) not in values:
                raise NPSError(f"settings: {name} must be one of {', '.join(values)}, got "
                               f"{getattr(self, name)!r}")

    def replace(self, **changes) -> "MergeSettings":
        return dataclasses.replace(self, **changes)
