"""BenchConfig: every setting of a benchmark run (printed into BENCHMARKS.md).

Its values key the result cache (:mod:`.cache`): ``search_params`` and ``eval_params`` go into
the params of every step, so a changed default re-runs the steps that use it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional, Tuple

from nps_pruning.apps.settings import PruneSettings
from nps_pruning.search import PARAM_DEFAULTS

# The library's search bounds and step sizes (search/cmaes_search.py), which the benchmark measures
# as "the default". Their values are part of the result-cache keys (search_params), so changing a
# library default re-runs the benchmark's searches; tests/test_registry.py pins today's numbers.
_LIN_LOWER, _LIN_UPPER, _LIN_SIGMA0 = PARAM_DEFAULTS["linear"]
_LOG_LOWER, _LOG_UPPER, _LOG_SIGMA0 = PARAM_DEFAULTS["log"]

_PRUNE = PruneSettings()       # the library's bands / scheme / focus

RESULTS_VERSION = 1

# The ViT suite's smaller NPS grid (a ViT search costs ~4 s per candidate on 2 CPU cores, five
# times a MiniLM one): NPS focused at r in {0.02, 0.05, 0.1}, uniform at 0.05, no ablations. Its
# baselines, fusion and compression run as for every suite. `--suite-grid vit=full` runs it all.
VIT_GRID: Dict[str, Any] = {"nps_keep_ratios": (0.02, 0.05, 0.1), "uniform_keep_ratios": (0.05,),
                            "ablation_keep_ratios": (), "sigma0_ablation": (), "long_keep": None}

# The LLM suites' grid (SmolLM2-135M on one thread: 3-10 s per candidate on 64 calibration rows,
# 15-45 s a test score): magnitude and DARE at r in {0.02, 0.05, 0.1}, NPS focused at 0.05 (what
# fusion, compression and transfer reuse) with 4 generations of 6, no ablations; transfer at
# r = 0.05 on rt-sentiment; fusion: TIES, TSV-M and NPS-merge (one λ for all tasks) on 3-point λ
# grids, no per-task λ search, no value-codings study (a merged model costs ~30 s on calibration
# and ~100 s on 150 test rows of the three tasks with one thread).
LLM_GRID: Dict[str, Any] = {"keep_ratios": (0.02, 0.05, 0.1), "baselines": ("magnitude", "dare"),
                            "nps_keep_ratios": (0.05,), "uniform_keep_ratios": (),
                            "ablation_keep_ratios": (), "sigma0_ablation": (), "long_keep": None,
                            "transfer_keep": 0.05, "transfer_tasks": ("rt-sentiment",),
                            "batch_size": 16, "generations": 4, "popsize": 6,
                            "memory_tasks": ("rt-sentiment",),
                            # fusion: 3-point λ grids, one NPS-merge normalization, 2 λ generations
                            "ta_grid": (0.4, 0.7, 1.0), "ties_grid": (0.8, 1.4, 2.0),
                            "nps_merge_grid": (0.8, 1.4, 2.0), "svd_grid": (0.6, 1.0, 1.5),
                            "normalizations": ("mask-count",), "lambda_generations": 0,
                            "fusion_methods": ("ties", "tsv-m"), "coding_keeps": ()}
LLM_SUITES = ("llm", "llm-lora")


@dataclass
class BenchConfig:
    """Every setting of a benchmark run (printed into BENCHMARKS.md)."""

    profile: str = "full"                       # "full" | "quick" (CI smoke)
    suites: Tuple[str, ...] = ("text", "vision", "vit", "llm", "llm-lora")
    # per-suite changes of the grid below (BenchConfig.for_suite); the other suites run it whole
    suite_grids: Dict[str, Dict[str, Any]] = field(default_factory=lambda: {
        "vit": dict(VIT_GRID), "llm": dict(LLM_GRID), "llm-lora": dict(LLM_GRID)})
    tasks_per_suite: Optional[int] = None       # None: every task of the suite
    # pruning grid
    keep_ratios: Tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.3)
    baselines: Tuple[str, ...] = ("magnitude", "dare", "random")
    # NPS, both band schemes, at every r of the grid (the paper's Fig. 4)
    nps_keep_ratios: Tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.3)        # NPS focused
    uniform_keep_ratios: Tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.3)    # NPS uniform
    ablation_keep_ratios: Tuple[float, ...] = (0.02, 0.05)  # NPS focused with upper=2, and with log2 search
    ablation_upper: float = 2.0
    # the log-scale parametrisation SPEC §1 asks about: CMA-ES over log2(w) in [log_lower, log_upper]
    log_lower: float = _LOG_LOWER                 # 0.25
    log_upper: float = _LOG_UPPER                 # 8.0
    log_sigma0: float = _LOG_SIGMA0               # 1.0
    # σ0 ablation: NPS focused with these initial step sizes (besides `sigma0`) at these r
    sigma0_ablation: Tuple[float, ...] = (0.1, 1.0)
    sigma0_keep_ratios: Tuple[float, ...] = (0.05,)
    # generations study: one NPS focused search of `long_generations` at r = `long_keep`, test-scored
    # at the best-so-far of each checkpoint generation (its first `generations` generations are
    # exactly the grid's search: CMA-ES does not depend on the number of generations to come)
    long_generations: int = 24
    long_keep: Optional[float] = 0.05
    long_checkpoints: Tuple[int, ...] = (0, 1, 2, 4, 8, 12, 16, 24)
    # NPS search. bands, scheme and focus equal the CLI's defaults; generations and popsize are the
    # benchmark's own budget (the CLI's: 30 generations, CMA-ES' own 4 + 3 ln M population).
    bands: int = _PRUNE.bands                     # 8
    scheme: str = _PRUNE.scheme                   # "focused"
    focus: float = _PRUNE.focus                   # 3.0
    generations: int = 8
    popsize: int = 8
    sigma0: float = _LIN_SIGMA0                   # 0.3
    lower: float = _LIN_LOWER                     # 0.0
    upper: float = _LIN_UPPER                     # 4.0
    seed: int = 0
    calib_size_text: int = 128
    calib_size_vision: int = 256
    calib_size_llm: int = 64
    test_rows_llm: Optional[int] = 150           # seeded subset of each LLM test file (300 rows)
    test_rows_text: Optional[int] = 1000         # seeded subset of each text test split
    test_rows_vision: Optional[int] = None       # None: the full test split
    test_seed: int = 0
    # fusion
    fusion_keep: float = 0.05                   # the NPS-focused pruned vectors merged by NPS-merge
    ta_grid: Tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0, 1.2)
    ties_keep: float = 0.2
    ties_grid: Tuple[float, ...] = (0.8, 1.1, 1.4, 1.7, 2.0, 2.3, 2.5)
    nps_merge_grid: Tuple[float, ...] = (0.8, 1.1, 1.4, 1.7, 2.0, 2.3, 2.5)
    svd_grid: Tuple[float, ...] = (0.4, 0.6, 0.8, 1.0, 1.2, 1.5, 2.0)   # TSV-M and Iso-C's λ (α)
    normalizations: Tuple[str, ...] = ("mask-count", "lambda-sum", "none")
    lambda_generations: int = 6
    # the λ-grid merges of the fusion table (besides average, NPS-merge and the pre-trained model)
    fusion_methods: Tuple[str, ...] = ("task-arithmetic", "ties", "dare-ties", "della", "tsv-m", "iso-c")
    # compression: the value codings' stores (exp_codings) of DARE and the default NPS at these r
    # (0.005 and 0.01: where a store can be below 0.1 bit an entry, issue 35's store target)
    coding_keeps: Tuple[float, ...] = (0.005, 0.01, 0.02, 0.05, 0.1)
    # transfer (text suite only)
    transfer_tasks: Tuple[str, ...] = ("rt-sentiment", "tweet-sentiment")
    # the tasks whose pruning job also measures the peak memory of an `nps prune` process
    memory_tasks: Tuple[str, ...] = ()
    transfer_keep: float = 0.1
    transfer_lambdas: Tuple[float, ...] = (0.4, 0.7, 1.0, 1.3)
    knn_k: int = 10
    knn_ref_rows: int = 150
    knn_select_rows: int = 100
    knn_report_rows: int = 150
    # speed
    speed_sizes: Tuple[int, ...] = (10**6, 10**7, 10**8)
    # execution (do not change results)
    threads: int = 1
    jobs: int = 2
    batch_size: int = 64

    @classmethod
    def quick(cls, **over) -> "BenchConfig":
        base = dict(profile="quick", tasks_per_suite=1, keep_ratios=(0.05,), nps_keep_ratios=(0.05,),
                    uniform_keep_ratios=(0.05,), ablation_keep_ratios=(0.05,), sigma0_ablation=(1.0,),
                    sigma0_keep_ratios=(0.05,), long_generations=3, long_keep=0.05, long_checkpoints=(0, 2, 3),
                    generations=2, popsize=4, calib_size_text=32,
                    calib_size_vision=64, test_rows_text=32, ta_grid=(1.0,), ties_grid=(1.0,), svd_grid=(1.0,),
                    nps_merge_grid=(1.0,), lambda_generations=1, transfer_tasks=("rt-sentiment",),
                    transfer_keep=0.05, transfer_lambdas=(1.0,), knn_k=5, knn_ref_rows=48, knn_select_rows=32,
                    knn_report_rows=48, coding_keeps=(0.05,), speed_sizes=(10**5,),
                    jobs=1, threads=2, suite_grids={})
        base.update(over)
        return cls(**base)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BenchConfig":
        names = {f.name: f for f in dataclasses.fields(cls)}
        out = {}
        for k, v in d.items():
            if k in names:
                out[k] = tuple(v) if isinstance(v, list) else v
        return cls(**out)

    def for_suite(self, suite: str) -> "BenchConfig":
        """This config with ``suite_grids[suite]`` applied (the grid that suite runs)."""
        over = {k: tuple(v) if isinstance(v, list) else v for k, v in self.suite_grids.get(suite, {}).items()}
        return dataclasses.replace(self, **over)

    def calib_size(self, suite: str) -> int:
        if suite in LLM_SUITES:
            return self.calib_size_llm
        return self.calib_size_text if suite == "text" else self.calib_size_vision

    def test_rows(self, suite: str) -> Optional[int]:
        if suite in LLM_SUITES:
            return self.test_rows_llm
        return self.test_rows_text if suite == "text" else self.test_rows_vision

    def search_params(self, suite: str) -> dict:
        return {"bands": self.bands, "focus": self.focus, "generations": self.generations,
                "popsize": self.popsize, "sigma0": self.sigma0, "lower": self.lower, "seed": self.seed,
                "calib_size": self.calib_size(suite)}

    def eval_params(self, suite: str) -> dict:
        return {"calib_size": self.calib_size(suite), "test_rows": self.test_rows(suite),
                "test_seed": self.test_seed, "seed": self.seed, "v": RESULTS_VERSION}
