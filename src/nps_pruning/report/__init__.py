"""Reports: plots of a search (report.json is assembled by the apps)."""
from .plots import plot_search, search_curves

__all__ = ["plot_search", "search_curves"]
