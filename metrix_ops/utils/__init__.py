"""Helpers beside the losses, as PML's `utils` (distributed: multi-process training)."""
from . import distributed  # noqa: F401

__all__ = ["distributed"]
