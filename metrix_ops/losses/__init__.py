from .._autoimport import import_all

__all__ = import_all(__name__, __path__, globals())
