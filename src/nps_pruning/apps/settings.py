"""The library's typed settings: what :func:`~nps_pruning.apps.prune.prune`,
:func:`~nps_pruning.apps.merge.nps_merge_lambdas` / :func:`~nps_pruning.apps.merge.merge_with_lambda_grid`
and :func:`~nps_pruning.apps.transfer.transfer` take instead of the CLI's option objects.

Their defaults are the CLI's (``nps prune`` with no flags prunes with exactly ``PruneSettings()``;
a test holds the two together). The CLI and YAML map their options onto them in one place, the
``from_options`` class methods below; everything else (the benchmark, the demo, a library caller)
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

from ..errors import NPSError
from ..search.cmaes_search import SearchSettings, shipped_search

__all__ = ["PruneSettings", "MergeSettings", "SearchSettings"]

AUTOCASTS = (None, "bf16")         # PruneSettings.autocast's values (the CLI's --autocast off|bf16)
_SEARCH_FIELDS = tuple(f.name for f in dataclasses.fields(SearchSettings))


@dataclass(frozen=True)
class PruneSettings:
    """How one task vector is pruned (NPS or a baseline) and how candidates are scored.

    ``seed`` is the run's one seed (CMA-ES, the hybrid space's random share, the calibration
    subsample, DARE) and ``space`` the NPS search space; both are also ``search``'s fields, kept
    equal to these: left at None they are read from ``search``, given they replace ``search``'s.
    ``fitness`` None is the default fitness (loglik; a python: evaluator's own score).
    """

    keep_ratio: float = 0.05          # fraction of prunable entries kept (round(keep_ratio*D))
    bands: int = 8                    # magnitude-rank bands M searched by NPS
    scheme: str = "focused"           # where the band cuts go (core.bands SCHEMES)
    focus: float = 3.0                # focused scheme: the first M-1 bands split the top focus*keep
    kept_values: str = "weighted"     # kept entries carry their band weight, or "original" value
    search: SearchSettings = field(default_factory=shipped_search)   # the CMA-ES part
    seed: Optional[int] = None        # None: search.seed
    space: Optional[str] = None       # None: search.space ("hybrid" or "magnitude")
    fitness: Optional[str] = None     # accuracy | loglik | agreement; None: the evaluator's default
    holdout: float = 0.25             # share of calibration rows held out to re-score the best
    rescore_top: int = 5              # how many best candidates are re-scored on the held-out rows
    holdout_min_rows: int = 32        # fewer rows would be held out: no hold-out (session.HOLDOUT_MIN_ROWS)
    calib_size: Optional[int] = None  # score a seeded subsample of this many calibration rows
    batch_size: int = 64
    max_length: int = 128             # text evaluators: maximum tokens per row
    autocast: Optional[str] = None    # "bf16": the search's forward passes under bf16 autocast
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

    # -- the CLI's mapping (the only place option names meet settings) ---------------------------

    @classmethod
    def from_options(cls, opts) -> "PruneSettings":
        """The settings of a ``nps prune/transfer/merge/compress`` options object
        (:class:`~nps_pruning.config.SearchOptions`); the bounds and step size left unset take
        their parametrisation's defaults (errors name the CLI flags: this is the CLI's side)."""
        # a baseline does not search: its (unused) bounds are not checked, as they never were
        search = (search_settings_from_options(opts) if getattr(opts, "method", "nps") == "nps"
                  else shipped_search())
        return cls(keep_ratio=opts.keep, bands=opts.bands, scheme=opts.scheme, focus=opts.focus,
                   kept_values=opts.kept_values, search=search,
                   seed=opts.seed, space=opts.space, fitness=opts.fitness, holdout=opts.holdout,
                   rescore_top=opts.rescore_top,
                   holdout_min_rows=getattr(opts, "holdout_min_rows", cls.holdout_min_rows),
                   calib_size=opts.calib_size,
                   batch_size=opts.batch_size, max_length=opts.max_length,
                   autocast=None if getattr(opts, "autocast", "off") == "off" else opts.autocast,
                   executor=opts.executor,
                   workers=opts.workers, ray_address=opts.ray_address)


def resolved_search_bounds(opts) -> tuple:
    """(lower, upper, sigma0) of an options object, each one not given taken from its
    parametrisation (:meth:`SearchSettings.for_param`); errors name the CLI flags."""
    st = SearchSettings.for_param(opts.param, lower=opts.lower, upper=opts.upper, sigma0=opts.sigma0)
    if st.param == "log" and st.lower <= 0:
        raise NPSError("--param log needs --lower > 0 (the search runs over log2 of the weights)")
    if st.upper <= st.lower:
        raise NPSError(f"--upper {st.upper:g} must be above --lower {st.lower:g}")
    return st.lower, st.upper, st.sigma0


def search_settings_from_options(opts) -> SearchSettings:
    """The CMA-ES settings of an options object: every :class:`SearchSettings` field the options
    have, with ``lower``/``upper``/``sigma0`` filled in by parametrisation."""
    lower, upper, sigma0 = resolved_search_bounds(opts)
    same = {name: getattr(opts, name) for name in _SEARCH_FIELDS if hasattr(opts, name)}
    from ..search.race import RACE_OFF
    if same.get("race") == RACE_OFF:      # --race off: no racing
        same["race"] = None
    if same.get("patience") == 0:         # --patience 0: no early stop
        same["patience"] = None
    return SearchSettings(**{**same, "lower": lower, "upper": upper, "sigma0": sigma0})


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
    collide: str = "allow"            # core.collide.allot rule on the sparse vectors before merging
    trim: str = "global"              # TIES' trim: global | layer | sequential
    joint_generations: int = 0        # NPS-merge: merge-aware joint search after the two stages
    matrices: str = "2d"              # tsv-m / iso-c: which tensors are matrices (merge_svd.MATRIX_RULES)

    def __post_init__(self):
        object.__setattr__(self, "lambda_grid", tuple(self.lambda_grid))   # as given: the report lists them
        if int(self.lambda_generations) < 0:
            raise NPSError(f"settings: lambda_generations must be >= 0, got {self.lambda_generations}")
        if int(self.joint_generations) < 0:
            raise NPSError(f"settings: joint_generations must be >= 0, got {self.joint_generations}")
        from ..core.collide import COLLIDE_RULES
        from ..core.merge import TRIMS
        if self.collide not in COLLIDE_RULES:
            raise NPSError(f"settings: collide must be one of {', '.join(COLLIDE_RULES)}, got {self.collide!r}")
        if self.trim not in TRIMS:
            raise NPSError(f"settings: trim must be one of {', '.join(TRIMS)}, got {self.trim!r}")
        from ..core.merge_svd import MATRIX_RULES
        if self.matrices not in MATRIX_RULES:
            raise NPSError(f"settings: matrices must be one of {', '.join(MATRIX_RULES)}, "
                           f"got {self.matrices!r}")

    def replace(self, **changes) -> "MergeSettings":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_options(cls, opts) -> "MergeSettings":
        """The settings of a ``nps merge`` options object (:class:`~nps_pruning.config.MergeOptions`)."""
        return cls(lambda_grid=tuple(opts.lambda_grid), keep_ratio=opts.keep,
                   normalize=opts.normalize, lambda_generations=opts.lambda_generations,
                   seed=opts.seed, max_failures=opts.max_failures, collide=opts.collide,
                   trim=opts.trim, joint_generations=opts.joint_generations,
                   matrices=opts.svd_matrices)
