"""The compiled extension, if it was built. Importing metrix_ops never fails without it."""
from __future__ import annotations

import importlib

import torch

_IMPORT_ERROR: BaseException | None = None
try:
    # Loading it registers torch.ops.metrix_ops.*. import_module rather than `from . import
    # _C`: when it is missing, that form reports a misleading "circular import".
    _C = importlib.import_module(__package__ + "._C")

    HAS_EXT = True
except (ImportError, OSError) as e:  # not built, or built against another torch (symbols)
    HAS_EXT = False
    _IMPORT_ERROR = e

HAS_CUDA_EXT = False
if HAS_EXT:
    try:
        HAS_CUDA_EXT = bool(torch.ops.metrix_ops.compiled_with_cuda())
    except (AttributeError, RuntimeError):  # a stale build from before the op existed
        HAS_CUDA_EXT = False


def has_op(op: str) -> bool:
    """Whether the build defines metrix_ops::`op`: an extension built before the op existed (a
    stale build) must not break the import, its callers take their PyTorch form instead."""
    if not HAS_EXT:
        return False
    try:
        getattr(torch.ops.metrix_ops, op)
        return True
    except (AttributeError, RuntimeError):
        return False


def has_cuda_kernel(op: str) -> bool:
    """Whether the build registered a CUDA kernel for metrix_ops::`op` (ops defined by the CPU
    build too get one only in a CUDA build; an op a stale build lacks has none)."""
    if not HAS_CUDA_EXT:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"metrix_ops::{op}", "CUDA")
    except RuntimeError:  # "operator ... does not exist"
        return False


BUILD_HINT = "build it with `pip install --no-build-isolation -e .` from the repository root"


def require_ext(backend: str) -> None:
    """Raises a RuntimeError saying how to build when `backend` ('cpu' or 'cuda') is missing."""
    if backend not in ("cpu", "cuda"):
        raise ValueError(f"backend must be 'cpu' or 'cuda', got {backend!r}")
    if not HAS_EXT:
        raise RuntimeError(f"backend={backend!r} needs the compiled extension metrix_ops._C, "
                           f"which is not available ({_IMPORT_ERROR}); {BUILD_HINT}")
    if backend == "cuda" and not HAS_CUDA_EXT:
        raise RuntimeError("backend='cuda' needs the CUDA kernels, which were not compiled: "
                           "install a CUDA toolkit and a CUDA build of torch, set CUDA_HOME to the "
                           "toolkit root (the folder with bin/nvcc), then rebuild with "
                           f"METRIX_OPS_CUDA=1; {BUILD_HINT}")
    if backend == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("backend='cuda' needs a CUDA device, and torch sees none")
