"""Checkpoint I/O: lazy reading, name matching, task vectors from two checkpoints, atomic writes."""
from .load import Checkpoint, open_checkpoint
from .names import detect_prefix, match_names
from .pair import load_task_vector
from .save import MARKER, atomic_output_dir, save_model_folder, save_tensors
from .sparse import read_task_vector, save_sparse_tensors

__all__ = ["Checkpoint", "open_checkpoint", "match_names", "detect_prefix", "load_task_vector",
           "atomic_output_dir", "save_model_folder", "save_tensors", "MARKER", "read_task_vector",
           "save_sparse_tensors"]
