"""Backend choice: "auto", "reference", "cpu", "cuda", "triton".

Fused backends register the losses they implement in `FUSED`; until a loss is there,
"auto" runs the reference. Asking explicitly for a backend that is not built or does not
implement the loss raises, so a benchmark never silently measures the wrong thing.
"""
from __future__ import annotations

import json
import os
import warnings

import torch

from . import _ext

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")

# backend name -> set of loss names it implements (filled in by the fused engines)
FUSED: dict[str, set] = {"cpu": set(), "cuda": set(), "triton": set()}

_warned_no_ext = False

# "auto" on CUDA tensors: the engines in order of preference per call variant, loss and batch
# size, measured: gpu_order.json, written by benchmarks/derive_gpu_order.py from the GPU
# benchmark results (now the H200 run, benchmarks/results/h200_*.json: fwd+bwd at B = 8192,
# D = 512, fp32 with TF32 and bf16, MS also at B up to 65536 and D = 128; CUDA faster for MS,
# Contrastive, NTXent and SupCon, Triton for ProxyAnchor; Circle measured on CUDA only, the
# triplet on Triton only). A table's value: a tuple of (max_b, order) ranges (max_b None: no
# upper bound; one range for an order of every size). Losses not measured keep Triton first
# (DESIGN §7: the slower of the two is not the default; the unmeasured one is not trusted).
GPU_DEFAULT_ORDER = ("triton", "cuda")
VARIANTS = ("clean", "miner", "metrix", "expansion")
# engines whose coverage of a variant depends on the labels' values (Triton's EE kernels take
# classes of at most 64 rows; its Metrix kernels cut larger classes into blocks): a compiled
# graph cannot read them, so under torch.compile "auto" tries these engines last (eagerly a
# larger class goes to the next engine; compiled, the Triton op could only raise)
VALUE_DEPENDENT = {"triton": ("expansion",)}


def load_gpu_order(path: str) -> dict:
    """variant -> {loss: ((max_b, order), ...)} from a derive_gpu_order.py file ({} per
    variant when the file is absent)."""
    tables = {v: {} for v in VARIANTS}
    try:
        with open(path) as f:
            orders = json.load(f)["orders"]
    except FileNotFoundError:
        return tables
    for variant, losses in orders.items():
        for loss, ranges in losses.items():
            tables.setdefault(variant, {})[loss] = tuple(
                (r["max_b"], tuple(r["order"])) for r in ranges)
    return tables


_MEASURED = load_gpu_order(os.path.join(os.path.dirname(__file__), "gpu_order.json"))
GPU_ORDER: dict = _MEASURED["clean"]
GPU_MINER_ORDER: dict = _MEASURED["miner"]
GPU_METRIX_ORDER: dict = _MEASURED["metrix"]
GPU_EXPANSION_ORDER: dict = _MEASURED["expansion"]
_GPU_TABLES = {"clean": GPU_ORDER, "miner": GPU_MINER_ORDER, "metrix": GPU_METRIX_ORDER,
               "expansion": GPU_EXPANSION_ORDER}


def order_for(entry, batch: int | None) -> tuple:
    """The order of a table entry ((max_b, order) ranges, max_b None: no upper bound) for a
    batch of `batch` rows (None: the first range's)."""
    for max_b, order in entry:
        if max_b is None or batch is None or batch <= max_b:
            return order
    return entry[-1][1]


def _available(backend: str) -> bool:
    if backend == "cpu":
        return _ext.HAS_EXT
    if backend == "cuda":
        return _ext.HAS_EXT and _ext.HAS_CUDA_EXT and torch.cuda.is_available()
    if backend == "triton":
        from .triton.launch import HAS_TRITON
        return HAS_TRITON
    return True


def _device_ok(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> bool:
    if backend == "triton":
        from .triton.launch import usable_on
        return usable_on(device, dtype)
    return True


def auto_order(loss_name: str, device: torch.device, variant: str = "clean",
               batch: int | None = None, dtype: torch.dtype | None = None) -> list:
    """The fused engines "auto" may use for `loss_name` on `device`, preferred first (the
    driver takes the first that covers the call's options); `variant`: "clean", "miner"
    (the call has miner=), "metrix" (an embedding-level Metrix term) or "expansion"
    (expansion=); `batch`: the call's batch size (the measured orders may change with it);
    `dtype`: the embeddings' (an engine may not take fp64: Triton older than 3.5)."""
    if device.type != "cuda":
        order = ("cpu",)
    else:
        entry = _GPU_TABLES[variant].get(loss_name)
        order = GPU_DEFAULT_ORDER if entry is None else order_for(entry, batch)
        if torch.compiler.is_compiling():
            order = sorted(order, key=lambda b: variant in VALUE_DEPENDENT.get(b, ()))
    return [b for b in order
            if loss_name in FUSED[b] and _available(b) and _device_ok(b, device, dtype)]


def resolve(backend: str, loss_name: str, device: torch.device,
            dtype: torch.dtype | None = None) -> str:
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
        order = auto_order(loss_name, device, dtype=dtype)
        return order[0] if order else "reference"
    if backend in ("cpu", "cuda"):
        _ext.require_ext(backend)
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
    if backend == "triton":
        from .triton.launch import usable_on, why_not
        if not usable_on(device, dtype):
            raise ValueError(f"backend='triton' cannot run here: {why_not(device, dtype)}")
    if loss_name not in FUSED[backend]:
        raise NotImplementedError(f"backend={backend!r} does not implement {loss_name} yet; "
                                  "use backend='auto' or 'reference'")
    return backend
