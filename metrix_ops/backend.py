"""Backend choice: "auto", "reference", "cpu", "cuda", "triton".

Fused backends register the losses they implement in `FUSED`; until a loss is there,
"auto" runs the reference. Asking explicitly for a backend that is not built or does not
implement the loss raises, so a benchmark never silently measures the wrong thing.
"""
from __future__ import annotations

import warnings

import torch

from . import _ext

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")

# backend name -> set of loss names it implements (filled in by the fused engines)
FUSED: dict[str, set] = {"cpu": set(), "cuda": set(), "triton": set()}

_warned_no_ext = False

# "auto" on CUDA tensors: the engines in order of preference, per loss from GPU measurements
# (DESIGN §7: the slower of Triton and CUDA is not the default). No GPU run has compared them
# yet (scripts/gpu_check.sh writes the comparison), so every loss keeps the Triton engine
# first, as before the CUDA losses existed; fill GPU_ORDER from the first measurements.
GPU_DEFAULT_ORDER = ("triton", "cuda")
GPU_ORDER: dict = {}


def _available(backend: str) -> bool:
    if backend == "cpu":
        return _ext.HAS_EXT
    if backend == "cuda":
        return _ext.HAS_EXT and _ext.HAS_CUDA_EXT and torch.cuda.is_available()
    if backend == "triton":
        from .triton.launch import HAS_TRITON
        return HAS_TRITON
    return True


def _device_ok(backend: str, device: torch.device) -> bool:
    if backend == "triton":
        from .triton.launch import usable_on
        return usable_on(device)
    return True


def resolve(backend: str, loss_name: str, device: torch.device) -> str:
    global _warned_no_ext
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return backend
    if backend == "auto":
        if not _ext.HAS_EXT and not _warned_no_ext:
            _warned_no_ext = True
            warnings.warn("metrix_ops: the compiled extension is not built; backend='auto' uses "
                          "the pure-PyTorch reference (build with `pip install "
                          "--no-build-isolation -e .`)", RuntimeWarning, stacklevel=3)
        order = GPU_ORDER.get(loss_name, GPU_DEFAULT_ORDER) if device.type == "cuda" else ("cpu",)
        for b in order:
            if loss_name in FUSED[b] and _available(b) and _device_ok(b, device):
                return b
        return "reference"
    if backend in ("cpu", "cuda"):
        _ext.require_ext(backend)
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
    if backend == "triton":
        from .triton.launch import usable_on, why_not
        if not usable_on(device):
            raise ValueError(f"backend='triton' cannot run here: {why_not(device)}")
    if loss_name not in FUSED[backend]:
        raise NotImplementedError(f"backend={backend!r} does not implement {loss_name} yet; "
                                  "use backend='auto' or 'reference'")
    return backend
