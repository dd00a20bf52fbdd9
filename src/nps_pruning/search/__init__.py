"""CMA-ES search over band weights (SPEC §1 "Search")."""
from .cmaes_search import SearchAborted, SearchResult, SearchSettings, best_up_to, run_search
from .executors import make_executor
from .scorer import CandidateScorer

__all__ = ["SearchSettings", "SearchResult", "SearchAborted", "best_up_to", "run_search", "make_executor",
           "CandidateScorer"]
