"""metrix_ops: fused deep-metric-learning losses, drop-in for pytorch-metric-learning,
with Metrix (mixup with interpolated labels) and Embedding Expansion on any loss."""
from . import reference  # registers every loss  # noqa: F401  (must come first)
from . import distances, functional, losses, miners, reducers, regularizers  # noqa: F401
from .config import Expansion, Metrix

__version__ = "0.1.0"
__all__ = ["Metrix", "Expansion", "losses", "functional", "miners", "reducers", "regularizers",
           "distances", "reference"]


def __getattr__(name):
    # Heavier or optional parts load on first use.
    import importlib
    if name in ("mixup", "metrics", "ops", "train", "expansion", "utils"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(name)
