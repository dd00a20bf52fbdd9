"""The command line's one mapping of an options object (:mod:`.options`) onto the library's
settings (:mod:`nps_pruning.apps.settings`), and the checks whose errors name the CLI's flags.

Nothing below :mod:`nps_pruning.cli` receives an options object: the commands call these and
hand the library settings. The search bounds left unset take their parametrisation's defaults
through :meth:`SearchSettings.for_param`, the one place those are written.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from ..apps.settings import MergeSettings, PruneSettings
from ..errors import NPSError
from ..search.cmaes_search import SearchSettings, shipped_search
from ..search.race import RACE_OFF

_SEARCH_FIELDS = tuple(f.name for f in dataclasses.fields(SearchSettings))


def search_settings(opts) -> SearchSettings:
    """The CMA-ES settings of an options object: every :class:`SearchSettings` field the options
    have, with ``lower``/``upper``/``sigma0`` filled in by parametrisation."""
    bounds = SearchSettings.for_param(opts.param, lower=opts.lower, upper=opts.upper, sigma0=opts.sigma0)
    if bounds.param == "log" and bounds.lower <= 0:
        raise NPSError("--param log needs --lower > 0 (the search runs over log2 of the weights)")
    if bounds.upper <= bounds.lower:
        raise NPSError(f"--upper {bounds.upper:g} must be above --lower {bounds.lower:g}")
    same = {name: getattr(opts, name) for name in _SEARCH_FIELDS if hasattr(opts, name)}
    if same.get("race") == RACE_OFF:      # --race off: no racing
        same["race"] = None
    if same.get("patience") == 0:         # --patience 0: no early stop
        same["patience"] = None
    # --patience-gap / --race-gap / --refine-gap -1: off (plain patience, race and refine always)
    for gap in ("patience_gap", "race_gap", "refine_gap"):
        if (same.get(gap) or 0) < 0:
            same[gap] = None
    return SearchSettings(**{**same, "lower": bounds.lower, "upper": bounds.upper, "sigma0": bounds.sigma0})


def prune_settings(opts, method: Optional[str] = None) -> PruneSettings:
    """The settings of a ``nps prune/transfer/merge/compress`` options object
    (:class:`~.options.SearchOptions`) for pruning with ``method`` (default: ``opts.method``;
    ``nps merge --prune nps`` prunes with NPS whatever its merge method)."""
    # a baseline does not search: its (unused) bounds are not checked, as they never were
    method = opts.method if method is None else method
    search = search_settings(opts) if method == "nps" else shipped_search()
    return PruneSettings(keep_ratio=opts.keep, bands=opts.bands, scheme=opts.scheme, focus=opts.focus,
                         kept_values=opts.kept_values, search=search,
                         seed=opts.seed, space=opts.space, fitness=opts.fitness, holdout=opts.holdout,
                         rescore_top=opts.rescore_top, holdout_min_rows=opts.holdout_min_rows,
                         calib_size=opts.calib_size, batch_size=opts.batch_size,
                         max_length=opts.max_length,
                         autocast=None if opts.autocast == "off" else opts.autocast,
                         cpu_linear=opts.cpu_linear,
                         executor=opts.executor, workers=opts.workers, ray_address=opts.ray_address)


def merge_settings(opts) -> MergeSettings:
    """The settings of a ``nps merge`` options object (:class:`~.options.MergeOptions`)."""
    return MergeSettings(lambda_grid=tuple(opts.lambda_grid), keep_ratio=opts.keep,
                         normalize=opts.normalize, lambda_generations=opts.lambda_generations,
                         seed=opts.seed, max_failures=opts.max_failures, collide=opts.collide,
                         trim=opts.trim, joint_generations=opts.joint_generations,
                         matrices=opts.svd_matrices,
                         cpu_linear=opts.cpu_linear,
                         # a fixed λ or the joint search (a refinement of Eq. 7): Eq. 7, no pick
                         combine="nps" if opts.lam is not None or opts.joint_generations else opts.combine)


def check_prune_options(method: str, opts, eval_spec: Optional[str]) -> None:
    """What :func:`~nps_pruning.apps.prune.prune` refuses, said in the CLI's flags (checked
    before it runs)."""
    if method == "nps" and not eval_spec:
        raise NPSError("--method nps needs a calibration evaluator (--eval SPEC)")
    if method == "nps" and opts.space == "hybrid" and opts.kept_values != "weighted":
        raise NPSError("--kept-values original needs --space magnitude (the hybrid space "
                       "carries its own scales)")
