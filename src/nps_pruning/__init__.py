"""nps-pruning: Neural Parameter Search for slimmer fine-tuned models (Du et al., ACL 2025)."""
__version__ = "0.1.0"

from .errors import NPSError
from .task_vector import Layout, TaskVector

__all__ = ["NPSError", "Layout", "TaskVector", "__version__"]
