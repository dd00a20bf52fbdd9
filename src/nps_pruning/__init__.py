"""nps-pruning: Neural Parameter Search for slimmer fine-tuned models (Du et al., ACL 2025).

The main API is importable from here (loaded on first use, so ``import nps_pruning`` stays cheap)::

    from nps_pruning import Session, PruneSettings, prune
    session = Session.load("base/", "ft/")
    outcome = prune(session, "nps", settings=PruneSettings(), eval_spec="text-classification:calib.csv")
"""
__version__ = "0.1.0"

import importlib

from .errors import NPSError
from .task_vector import Layout, TaskVector

# public name -> module that defines it
_API = {
    "Session": "apps.session", "PruneSettings": "apps.settings", "SearchSettings": "apps.settings",
    "MergeSettings": "apps.settings", "prune": "apps.prune", "transfer": "apps.transfer",
    "merge": "core.merge", "nps_combine": "core.merge", "merge_with_lambda_grid": "apps.merge",
    "nps_merge_lambdas": "apps.merge", "joint_nps_merge": "apps.merge", "MERGERS": "core.merge", "PRUNERS": "core",
    "make_bands": "core", "build_candidate": "core", "load_task_vector": "checkpoints",
    "open_checkpoint": "checkpoints", "save_model_folder": "checkpoints",
    "read_task_vector": "checkpoints", "make_evaluator": "evaluation", "StoreTask": "store",
    "write_store": "store", "read_store": "store", "restore_task": "store",
    "store_info": "store", "resolve_input": "checkpoints.external",
}

__all__ = ["NPSError", "Layout", "TaskVector", "__version__", *_API]


def __getattr__(name):
    if name in _API:
        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'nps_pruning' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
