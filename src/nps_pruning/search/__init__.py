"""CMA-ES search over band weights (SPEC §1 "Search"), and the one λ-grid search."""
from .cmaes_search import (PARAM_DEFAULTS, POPSIZE_MIN, SHIPPED_SEARCH, SearchAborted, SearchResult,
                           SearchSettings, best_up_to, run_search, shipped_search)
from .executors import make_executor
from .grid import GridChoice, grid_search
from .scorer import CandidateScorer

__all__ = ["SearchSettings", "SHIPPED_SEARCH", "shipped_search", "PARAM_DEFAULTS", "POPSIZE_MIN", "SearchResult", "SearchAborted",
           "best_up_to", "run_search", "make_executor", "CandidateScorer", "grid_search",
           "GridChoice"]
