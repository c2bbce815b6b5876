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

# "auto" on CUDA tensors: the engines in order of preference, per loss, from the H200 run
# (benchmarks/results/h200_*.json, fwd+bwd at B = 8192, D = 512, fp32 with TF32 and bf16;
# MS also at B up to 65536 and D = 128): the CUDA row-chunk engine was faster for MS (1.3-3.8x),
# contrastive (1.3-1.4x), NTXent and SupCon (1.3x); Triton for ProxyAnchor (2-3x). Losses
# with one GPU engine, or not measured on both, keep Triton first (DESIGN §7: the slower of
# the two is not the default).
GPU_DEFAULT_ORDER = ("triton", "cuda")
GPU_ORDER: dict = {
    "MultiSimilarityLoss": ("cuda", "triton"),
    "ContrastiveLoss": ("cuda", "triton"),
    "NTXentLoss": ("cuda", "triton"),
    "SupConLoss": ("cuda", "triton"),
    "ProxyAnchorLoss": ("triton", "cuda"),
    # measured on the CUDA engine only (5.8 ms at 8192/512 fp32, 7.8x PML); the Triton Circle
    # kernels (sixth session) have not run on a GPU yet: the engine that has comes first
    "CircleLoss": ("cuda", "triton"),
}


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


# Calls with a loss option that runs inside the op, on CUDA tensors: miner= (mined inside the
# op) and an embedding-level Metrix term. Triton first, whose mined and Metrix kernels share
# the clean ones' tiles; the CUDA engine's mined MS and TripletMargin and its Metrix MS,
# Contrastive, Circle and GeneralizedLifted (twenty-second session) have not run on a GPU yet.
GPU_MINER_ORDER: dict = {}
GPU_METRIX_ORDER: dict = {}
_GPU_TABLES = {"clean": GPU_ORDER, "miner": GPU_MINER_ORDER, "metrix": GPU_METRIX_ORDER}


def auto_order(loss_name: str, device: torch.device, variant: str = "clean") -> list:
    """The fused engines "auto" may use for `loss_name` on `device`, preferred first (the
    driver takes the first that covers the call's options); `variant`: "clean", "miner"
    (the call has miner=) or "metrix" (an embedding-level Metrix term)."""
    if device.type != "cuda":
        order = ("cpu",)
    else:
        order = _GPU_TABLES[variant].get(loss_name, GPU_DEFAULT_ORDER)
    return [b for b in order if loss_name in FUSED[b] and _available(b) and _device_ok(b, device)]


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
        order = auto_order(loss_name, device)
        return order[0] if order else "reference"
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
