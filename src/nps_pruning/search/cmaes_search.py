"""CMA-ES over the band weights (SPEC §1 "Search").

``run_search`` scores w = 1 (plain magnitude top-k) first, then runs a seeded CMA-ES (the
``cmaes`` library) for a fixed number of generations and returns the best candidate ever seen.

Every candidate is appended to a JSONL log (search_log.py: flushed and fsync'd as soon as it is
known), so a killed run can be resumed: the same seeded CMA-ES is replayed, candidates found in the
log are not scored again, and CMA-ES is fed exactly the values it was fed the first time, so the
resumed run ends exactly where an uninterrupted one would.

The run is a loop over a :class:`~.state.SearchState` (state.py), which scores and records the
candidates, keeps the best and counts failures. Generation 0 scores the search space's start
points (w = 1 first), refined adaptively where the space asks for it; generations 1..G are
CMA-ES generations.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
from tqdm.auto import tqdm

from ..core.space import SEARCH_SPACES, make_space
from ..errors import NPSError
from .executors import make_executor
from .race import RACES, race_rows
from .search_log import LOG_FORMAT, SearchLog, log_header, previous_records, settings_dict
from .state import (SearchAborted, SearchResult, SearchState, best_up_to, near_reference, scores_of,
                    within_gap)

__all__ = ["PARAM_DEFAULTS", "POPSIZE_MIN", "SUBSPACES", "SHIPPED_SEARCH", "SearchSettings", "shipped_search", "SearchResult", "SearchAborted",
           "best_up_to", "run_search", "LOG_FORMAT"]


# The search's defaults, the only place they are written: the CLI, YAML configs (config.py) and
# the benchmark read them from here.
# Bounds and initial step size of the band weights by parametrisation: (lower, upper, sigma0), in
# the units searched (w for "linear", the weights themselves for "log", whose CMA-ES runs over
# log2 w). Chosen from the benchmark (BENCHMARKS.md, "Defaults chosen"): at small keep ratios the
# weights must be able to pass 2.
PARAM_DEFAULTS: Dict[str, Tuple[float, float, float]] = {
    "linear": (0.0, 4.0, 0.3),
    "log": (0.25, 8.0, 1.0),
}
SUBSPACES = ("family", "full")   # SearchSettings.subspace
POPSIZE_MAX = 4096               # beyond this a "search" is a typo (10**8 ran until killed)
POPSIZE_MIN = 4                  # the smallest CMA-ES population accepted (its own default is 4 + 3 ln M)


@dataclass
class SearchSettings:
    """How the band weights are searched. ``SearchSettings()`` is the plain CMA-ES of the paper
    (30 generations, every candidate scored on every calibration row); what ``nps prune`` runs
    with no flags is :func:`shipped_search` (:data:`SHIPPED_SEARCH` on top of these). For
    ``param="log"`` pass the bounds and step size of :data:`PARAM_DEFAULTS` ``["log"]`` (or use
    :meth:`for_param`)."""

    generations: int = 30
    sigma0: float = PARAM_DEFAULTS["linear"][2]
    lower: float = PARAM_DEFAULTS["linear"][0]
    upper: float = PARAM_DEFAULTS["linear"][1]
    popsize: Optional[int] = None   # None: the library default 4 + floor(3 ln M)
    seed: int = 0
    param: str = "linear"           # "linear": search w; "log": search log2(w) (needs lower > 0)
    max_failures: int = 5           # consecutive failed candidates before the run stops
    space: str = "hybrid"           # core.space.SPACES: "hybrid" or "magnitude" (the paper's)
    # "family": when the best start is (rescaled) magnitude top-k, the smaller half of the CMA-ES
    # population searches the magnitude line's sub-space from it (the hybrid's random share held
    # at 0; core.space HybridSpace.family_stream), the rest the whole space; "full": one stream
    subspace: str = "family"
    # Cheaper searches (issue 16), off by default: an unset one leaves the run as it was.
    patience: Optional[int] = None  # stop once the best score has not improved for N generations
    min_gain: Optional[float] = None  # --patience counts only gains of more than this (score units)
    min_generations: int = 0        # --patience stops nothing before this generation
    # --patience stops only a search within this of the fine-tuned model's score (reference_score)
    patience_gap: Optional[float] = None
    race: Optional[str] = None      # "halving": race each generation over the calibration rows
    race_min_rows: int = 16         # rows of the first racing stage
    race_eta: float = 3.0           # each stage keeps the top 1/eta (and rows grow eta-fold)
    race_z: float = 2.0             # ... plus those within z standard errors of the leader
    # race a generation only once the best score is within this of the fine-tuned model's score
    # (reference_score); further below it every candidate gets every row (None: always race)
    race_gap: Optional[float] = None
    # generation 0 refines the rescale only while its best start point is more than this below
    # the fine-tuned model's score (None: always)
    refine_gap: Optional[float] = None

    def to_dict(self) -> dict:
        """JSON-ready form, without the settings of the features that are off (the log header's
        and report.json's ``settings``)."""
        return settings_dict(self)

    @classmethod
    def for_param(cls, param: str = "linear", *, lower: Optional[float] = None,
                  upper: Optional[float] = None, sigma0: Optional[float] = None,
                  **rest) -> "SearchSettings":
        """Settings for ``param`` whose bounds and step size not given are that
        parametrisation's defaults (:data:`PARAM_DEFAULTS`)."""
        if param not in PARAM_DEFAULTS:
            raise NPSError(f"search: param must be 'linear' or 'log', got {param!r}")
        lo, hi, sigma = PARAM_DEFAULTS[param]
        return cls(param=param, lower=lo if lower is None else lower,
                   upper=hi if upper is None else upper,
                   sigma0=sigma if sigma0 is None else sigma0, **rest)

    def validate(self) -> None:
        if self.generations < 0:
            raise NPSError(f"search: generations must be >= 0, got {self.generations}")
        if not (self.sigma0 > 0 and math.isfinite(self.sigma0)):
            raise NPSError(f"search: sigma0 must be a positive number, got {self.sigma0}")
        if not (math.isfinite(self.lower) and math.isfinite(self.upper) and self.lower < self.upper):
            raise NPSError(f"search: bounds must satisfy lower < upper, got [{self.lower}, {self.upper}]")
        if self.popsize is not None and not POPSIZE_MIN <= self.popsize <= POPSIZE_MAX:
            raise NPSError(f"search: popsize must be in {POPSIZE_MIN}..{POPSIZE_MAX}, got {self.popsize}")
        if self.param not in PARAM_DEFAULTS:
            raise NPSError(f"search: param must be 'linear' or 'log', got {self.param!r}")
        if self.param == "log" and self.lower <= 0:
            raise NPSError(f"search: param='log' needs lower > 0, got lower={self.lower}")
        if self.subspace not in SUBSPACES:
            raise NPSError(f"search: unknown subspace {self.subspace!r} (choose from "
                           f"{', '.join(SUBSPACES)})")
        if self.space not in SEARCH_SPACES:
            raise NPSError(f"search: unknown space {self.space!r} (choose from {', '.join(SEARCH_SPACES)})")
        if self.max_failures < 1:
            raise NPSError(f"search: max_failures must be >= 1, got {self.max_failures}")
        if self.patience is not None and int(self.patience) < 1:
            raise NPSError(f"search: patience must be >= 1 generation, got {self.patience}")
        if self.min_gain is not None and not (math.isfinite(self.min_gain) and self.min_gain >= 0):
            raise NPSError(f"search: min_gain must be a number >= 0, got {self.min_gain}")
        if int(self.min_generations) < 0:
            raise NPSError(f"search: min_generations must be >= 0, got {self.min_generations}")
        if self.race is not None and self.race not in RACES:
            raise NPSError(f"search: unknown race {self.race!r} (choose from {', '.join(RACES)})")
        if int(self.race_min_rows) < 2:
            raise NPSError(f"search: race_min_rows must be >= 2, got {self.race_min_rows}")
        if not (math.isfinite(self.race_eta) and self.race_eta > 1):
            raise NPSError(f"search: race_eta must be > 1, got {self.race_eta}")
        if not (math.isfinite(self.race_z) and self.race_z >= 0):
            raise NPSError(f"search: race_z must be >= 0, got {self.race_z}")
        for name in ("patience_gap", "race_gap", "refine_gap"):   # off (None) or a score distance
            gap = getattr(self, name)
            if gap is not None and not (math.isfinite(gap) and gap >= 0):
                raise NPSError(f"search: {name} must be a number >= 0, got {gap}")


# What `nps prune` runs with no flags, on top of SearchSettings() (issue 32; BENCHMARKS.md "What
# the search is worth"). The old default's CMA-ES generations (30 of 11, every candidate on every
# row) added less than a standard error of test accuracy over generation 0 on text at 26x its
# forward passes, but many on MobileNetV2, whose searches climb far below the fine-tuned model.
# So near the fine-tuned model's own calibration score (within 0.02, loglik-t units) the default
# is cheap: generation 0 does not refine the rescale (never a text search's best point), each
# generation is raced (exactly the top third on, z = 0; "auto": where the evaluator scores rows
# and there are >= 144), and patience stops after 3 generations without a gain of more than 0.01
# (not before 6): every text search starts there and stops at 6. Further below, it is the old
# default: refined, unraced (racing mis-ranked climbing candidates: MobileNetV2 r = 0.05, 0.800
# raced against 0.812 at 30 generations), and no patience stop, up to 30 generations.
SHIPPED_SEARCH: Dict[str, Any] = {"generations": 30, "race": "auto", "race_z": 0.0, "patience": 3,
                                  "min_gain": 0.01, "min_generations": 6, "patience_gap": 0.02,
                                  "race_gap": 0.02, "refine_gap": 0.02}


def shipped_search(**changes) -> SearchSettings:
    """The search ``nps prune`` runs with no flags (the CLI's, YAML's and ``PruneSettings()``'s),
    with ``changes``."""
    return SearchSettings(**{**SHIPPED_SEARCH, **changes})


def run_search(scorer: Callable[[np.ndarray], Any], num_bands: int,
               settings: Optional[SearchSettings] = None, *, log_path=None, resume: bool = False,
               executor=None, progress: bool = True,
               on_generation: Optional[Callable[[dict], None]] = None,
               space=None, run_id: Optional[dict] = None,
               calib_rows: Optional[int] = None,
               reference_score: Optional[float] = None) -> SearchResult:
    """Search band weights with CMA-ES; see the module docstring.

    ``scorer(weights) -> (score, {"build_s", "eval_s"})`` (higher is better; a bare float is
    accepted). ``executor``: None / "serial" / "processes" / "ray" or an object from
    :func:`make_executor` (not closed here when passed in). Raises :class:`SearchAborted`
    (an NPSError carrying the partial result) after ``max_failures`` consecutive failures.

    ``space``: a :mod:`~nps_pruning.core.space` object (its ``name`` must be ``settings.space``);
    default the paper's band-weight space over ``settings``' bounds. Generation 0 scores the
    space's start points (magnitude top-k; the hybrid space also DARE and a half-and-half point);
    CMA-ES starts from the space's ``mean0`` of those scores. Records' ``weights`` are the points
    in parameter units (band weights, then the space's extra parameters).

    ``run_id`` (JSON-ready, see :mod:`.identity`) goes into the log's header; ``resume`` refuses
    a log whose header differs from this run's.

    ``settings.patience`` = N: stop after the first generation that ends N generations after the
    one that found the best score (a strictly higher score is an improvement); the result's
    ``stopped_early`` says so and ``stopped_at`` is that generation. It depends only on the
    scores, so a resumed run stops where the uninterrupted one did. ``settings.patience_gap`` G
    with ``reference_score`` R (the fine-tuned model's score on the same rows): it stops only once
    the best is >= R − G (a search still below the model it prunes runs on).

    ``settings.race = "halving"``: CMA-ES generations are raced over the calibration rows
    (:mod:`.race`); the scorer must have ``score_rows(weights, rows)``, and the number of
    calibration rows is ``calib_rows`` (default: ``scorer.num_rows``). ``settings.race_gap`` G
    with ``reference_score`` R: a generation is raced only once the best score so far is >= R − G
    (further below, every candidate is scored on every row); it depends only on the scores, so a
    resumed run races the generations the uninterrupted one did."""
    settings = settings or SearchSettings()
    settings.validate()
    num_bands = int(num_bands)
    if num_bands < 1:
        raise NPSError(f"search: num_bands must be >= 1, got {num_bands}")
    t_start = time.perf_counter()
    space = _resolve_space(space, settings, num_bands)
    log_path = Path(log_path) if log_path is not None else None
    header = log_header(num_bands, settings, run_id)
    num_rows = race_rows(scorer, settings, calib_rows)
    previous, tail = previous_records(log_path, header, resume)

    own_executor = executor is None or isinstance(executor, str)
    if own_executor:
        executor = make_executor(executor or "serial")
    log = SearchLog(log_path)
    state = SearchState(scorer=scorer, executor=executor, space=space, settings=settings,
                        num_bands=num_bands, log=log, previous=previous,
                        on_generation=on_generation, t_start=t_start)
    bar = None
    try:
        log.open(header, tail)
        mean0 = _generation_zero(state, space, reference_score)
        opt = _make_streams(space, settings, mean0)
        state.cma_free = opt.free_list()
        gain = _Gains(settings.min_gain, state.best_score, state.best_gen)
        bar = tqdm(total=settings.generations, disable=not progress, desc="NPS search",
                   unit="gen", dynamic_ncols=True, leave=False)
        bar.set_postfix(best=f"{state.best_score:.4f}", ex=state.examples, refresh=False)
        for gen in range(1, settings.generations + 1):
            t0 = time.perf_counter()
            xs = opt.ask_all()
            raced = num_rows is not None and within_gap(settings.race_gap, state.best_score,
                                                        reference_score)
            recs = (state.race_generation(gen, xs, num_rows) if raced
                    else state.score_generation(gen, xs))
            opt.tell(state.told(xs, recs))
            state.summarize(gen, recs, opt, time.perf_counter() - t0)
            bar.set_postfix(best=f"{state.best_score:.4f}", gen=gen, ex=state.examples,
                            refresh=False)
            bar.update(1)
            gain.see(gen, state.best_score, state.best_gen)
            if (settings.patience is not None and gain.gen is not None
                    and int(settings.min_generations) <= gen < settings.generations
                    and gen - gain.gen >= int(settings.patience)   # the last generation stops nothing
                    and (near := near_reference(settings, state.best_score, reference_score)) is not None):
                state.stop(f"patience: no {gain.what} in the {int(settings.patience)} "
                           f"generations after generation {gain.gen}{near}", gen)
                break
    finally:
        if bar is not None:
            bar.close()
        log.close()
        if own_executor:
            executor.close()
    return state.result()


class _Stream:
    """One CMA-ES over the coordinates ``free`` of the space, the others held at ``mean0``'s
    values: ``ask`` returns, ``tell`` takes and ``mean`` is a point of the whole space."""

    def __init__(self, mean0: np.ndarray, free: np.ndarray, bounds: np.ndarray,
                 scales: np.ndarray, sigma0: float, seed: int, popsize: int):
        from cmaes import CMA
        self.full, self.free, self.popsize = np.asarray(mean0, dtype=np.float64).copy(), free, popsize
        sub = scales[free]
        cov = None if np.all(sub == 1.0) else np.diag(sub ** 2)
        self.cma = CMA(mean=self.full[free], sigma=float(sigma0), bounds=bounds[free],
                       seed=int(seed), population_size=popsize, cov=cov)

    def _whole(self, x) -> np.ndarray:
        out = self.full.copy()
        out[self.free] = x
        return out

    def ask(self) -> np.ndarray:
        return self._whole(self.cma.ask())

    def tell(self, told) -> None:
        self.cma.tell([(np.asarray(x, dtype=np.float64)[self.free], v) for x, v in told])


class _Streams:
    """The CMA-ES generations: one stream over the whole space from ``mean0`` (the paper's
    search, and this one with ``subspace="full"``), and with ``subspace="family"`` where the
    space offers one (:meth:`family_stream`) a second over a sub-space, the population split
    between them: each generation asks both and tells each its own candidates. ``mean`` and
    ``_sigma`` are the first stream's (the generation summaries')."""

    def __init__(self, streams):
        self.streams = streams

    @property
    def population_size(self) -> int:
        return sum(st.popsize for st in self.streams)

    @property
    def mean(self) -> np.ndarray:
        return self.streams[0]._whole(self.streams[0].cma.mean)

    @property
    def _sigma(self) -> float:
        return self.streams[0].cma._sigma

    def ask_all(self):
        return [st.ask() for st in self.streams for _ in range(st.popsize)]

    def tell(self, told) -> None:
        i = 0
        for st in self.streams:
            st.tell(told[i:i + st.popsize])
            i += st.popsize

    def free_list(self) -> Optional[list]:
        """The second stream's free coordinates (None: one stream over the whole space)."""
        if len(self.streams) < 2:
            return None
        return [int(i) for i in np.flatnonzero(self.streams[1].free)]


def _make_streams(space, settings: "SearchSettings", mean0: np.ndarray) -> _Streams:
    """CMA-ES from ``mean0`` over the whole space; with ``settings.subspace == "family"`` and a
    family stream offered by the space (:meth:`~nps_pruning.core.space.HybridSpace.family_stream`:
    the coordinates it frees), the population (the library's default for the whole space,
    4 + floor(3 ln dim), unless set) is split: the whole space gets the larger half, the family
    stream, from the same start, the rest (seed + 1), so a search costs the same either way."""
    mean0 = np.asarray(mean0, dtype=np.float64)
    dim = mean0.size
    popsize = settings.popsize or 4 + math.floor(3 * math.log(dim))
    bounds = np.asarray(space.bounds(), dtype=np.float64)
    scales = np.asarray(space.step_scales(), dtype=np.float64)
    family = None
    if settings.subspace == "family" and callable(getattr(space, "family_stream", None)):
        family = space.family_stream(mean0)
    if family is None or popsize < 2 * POPSIZE_MIN:
        return _Streams([_Stream(mean0, np.ones(dim, dtype=bool), bounds, scales,
                                 settings.sigma0, settings.seed, popsize)])
    free = np.asarray(family, dtype=bool)
    if free.shape != (dim,) or not free.any():
        raise NPSError(f"search: the space's family stream frees {free.tolist()} of a "
                       f"{dim}-dimensional start")
    whole = popsize - popsize // 2
    return _Streams([_Stream(mean0, np.ones(dim, dtype=bool), bounds, scales, settings.sigma0,
                             settings.seed, whole),
                     _Stream(mean0, free, bounds, scales, settings.sigma0, settings.seed + 1,
                             popsize - whole)])


class _Gains:
    """The generation of the last gain ``--patience`` counts from: the generation that found the
    best score (``min_gain`` None), or the last one after which the best score exceeded the
    score of the previous counted gain by more than ``min_gain`` (generation 0's best is the
    first). Depends only on the scores, so a resumed run stops where the uninterrupted one did."""

    def __init__(self, min_gain: Optional[float], score0: Optional[float], gen0: Optional[int]):
        self.min_gain = None if min_gain is None else float(min_gain)
        self.ref, self.gen = score0, gen0
        self.what = ("better score" if self.min_gain is None
                     else f"gain of more than {self.min_gain:g}")

    def see(self, gen: int, best_score: Optional[float], best_gen: Optional[int]) -> None:
        if self.min_gain is None:
            self.gen = best_gen
        elif best_score is not None and (self.ref is None or best_score > self.ref + self.min_gain):
            self.ref, self.gen = best_score, gen


def _resolve_space(space, settings: SearchSettings, num_bands: int):
    """The search space: the one passed (checked against ``settings.space``) or the settings'."""
    if space is None:
        space = make_space(settings.space, num_bands, settings.lower, settings.upper, settings.param)
    if space.name != settings.space:
        raise NPSError(f"search: settings.space is {settings.space!r} but the space passed is "
                       f"{space.name!r}")
    return space


def _generation_zero(state: SearchState, space, reference: Optional[float] = None) -> np.ndarray:
    """Score the space's start points (first: w = 1, plain magnitude top-k) and the points its
    adaptive refinement adds (``space.refine_rounds`` rounds at most; none where the best start
    point is within ``settings.refine_gap`` of the fine-tuned model's score ``reference``);
    return CMA-ES's start mean (``space.mean0`` of all of them)."""
    t0 = time.perf_counter()
    points = list(space.start_points())
    recs = state.score_generation(0, points)
    _label(recs, space.start_labels())
    gap = state.settings.refine_gap
    near = gap is not None and reference is not None and within_gap(gap, state.best_score, reference)
    for round_ in range(0 if near else getattr(space, "refine_rounds", 0)):
        more, labels = space.refine(points, scores_of(recs), round_)
        if not more:
            break
        new = state.score_generation(0, more, first=len(points))
        _label(new, labels)
        points += more
        recs += new
    state.summarize(0, recs, None, time.perf_counter() - t0)
    return space.mean0(scores_of(recs), points)


def _label(recs, labels) -> None:
    # after the records are logged: the label is in report.json's candidates, not in the log
    for rec, label in zip(recs, labels):
        rec["start"] = label
