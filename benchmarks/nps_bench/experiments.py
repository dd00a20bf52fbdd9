"""The experiments behind BENCHMARKS.md: pruning, fusion, compression, transfer, speed (SPEC §4).

Work is split into jobs that run in worker processes (``BenchConfig.jobs``, each with
``BenchConfig.threads`` torch threads): one pruning job per task, one fusion+compression job per
suite (after its pruning jobs), one transfer job per transfer task. :mod:`.run` calls the jobs by
name from this module (``run_pruning_job``, ``run_fusion_job``, ``run_transfer_job``, ``run_speed``).

Every step's result is cached (:mod:`.cache`), so a killed ``make bench`` resumes where it stopped.

The code lives in one module per job; this module gathers them (and keeps every name it held
before the split importable from here):

* :mod:`.config` - :class:`BenchConfig`;
* :mod:`.cache` - :class:`ResultCache`, ``default_results_cache``, the job logger;
* :mod:`.context` - :class:`TaskContext`, ``task_dict``, ``stats_params``, ``nps_step_params``;
* :mod:`.exp_pruning`, :mod:`.exp_fusion`, :mod:`.exp_compression`, :mod:`.exp_transfer`,
  :mod:`.exp_speed` - one experiment each.
"""
from __future__ import annotations

from .cache import (DEADLINE_ENV, BudgetReached, ResultCache, _brief, _hash, _jsonable,  # noqa: F401
                    _logger, _set_threads, default_results_cache)
from .config import (RESULTS_VERSION, _LIN_LOWER, _LIN_SIGMA0, _LIN_UPPER, _LOG_LOWER,  # noqa: F401
                     _LOG_SIGMA0, _LOG_UPPER, BenchConfig)
from .context import (TaskContext, _find_nps, _strip, _task_params, nps_step_params,  # noqa: F401
                      stats_params, task_dict)
from .exp_compression import run_compression  # noqa: F401
from .exp_fusion import run_fusion_job  # noqa: F401
from .exp_merge_aware import run_merge_aware_job  # noqa: F401
from .exp_pruning import _checkpoints, nps_variants, run_pruning_job, torch_equal  # noqa: F401
from .exp_speed import run_speed  # noqa: F401
from .exp_transfer import _source_data, run_transfer_job  # noqa: F401
