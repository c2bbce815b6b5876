"""Pure-PyTorch, exact, readable implementations: the source of truth every fused backend
is tested against, and the fallback backend. Importing this package registers every loss."""
from .._autoimport import import_all

__all__ = import_all(__name__, __path__, globals())
