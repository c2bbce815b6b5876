"""The compiled extension, if it was built. Importing metrix_ops never fails without it."""
from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (loading it registers torch.ops.metrix_ops.*)

    HAS_EXT = True
    HAS_CUDA_EXT = bool(torch.ops.metrix_ops.compiled_with_cuda())
except ImportError as e:  # not built, or built against another torch
    HAS_EXT = False
    HAS_CUDA_EXT = False
    _IMPORT_ERROR = e

BUILD_HINT = ("build it with `pip install --no-build-isolation -e .` from the repository root")


def require_ext(backend: str) -> None:
    """Raises a RuntimeError saying how to build when `backend` ('cpu' or 'cuda') is missing."""
    if not HAS_EXT:
        raise RuntimeError(f"backend={backend!r} needs the compiled extension metrix_ops._C, "
                           f"which is not built ({_IMPORT_ERROR}); {BUILD_HINT}")
    if backend == "cuda" and not HAS_CUDA_EXT:
        raise RuntimeError("backend='cuda' needs the CUDA kernels, which were not compiled: "
                           "install a CUDA toolkit and a CUDA build of torch, set CUDA_HOME to the "
                           "toolkit root (the folder with bin/nvcc), then rebuild with "
                           f"METRIX_OPS_CUDA=1; {BUILD_HINT}")
    if backend == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("backend='cuda' needs a CUDA device, and torch sees none")
