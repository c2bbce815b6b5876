"""Similarities of listed pairs, s_k = x[rows_k] · r[cols_k], on the GPU in Triton: the CUDA
kernels of the extension's pair_sims_fwd / pair_sims_bwd ops (whose CPU kernels are C++,
csrc/cpu/pair_sims_cpu.cpp). With them every loss's indices_tuple path (fused/indices/: the
listed pairs' similarities, then PML's per-pair terms and scatter reductions in PyTorch, no
B×M matrix and no P×D gather) runs on CUDA tensors too, and is registered here for
backend="triton".

- forward: one program per BLOCK_P pairs, the two gathered rows multiplied and summed over
  feature steps (a row-wise dot, not a tile product: the pairs share no rows in general).
- backward: dx[rows_k] += g_k r[cols_k] and dr[cols_k] += g_k x[rows_k] by atomic adds, in
  the accumulation type. A pair list has no structure to give each output row one writer
  (the CPU kernel buckets the pairs by row first); the adds make the gradient's last bits
  depend on the order the GPU runs them in."""
from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl

from .. import _ext, fused
from ..fused import indices  # noqa: F401 (its CPU registrations, copied below)
from ..ops.pair_sims import HAS_OP
from .launch import usable_on
from .tiles import acc_dtype


@triton.jit
def _sims_fwd_kernel(x_ptr, r_ptr, rows_ptr, cols_ptr, out_ptr, P, D, stride_x, stride_r,
                     BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    ok = offs_p < P
    ri = tl.load(rows_ptr + offs_p, mask=ok, other=0)
    ci = tl.load(cols_ptr + offs_p, mask=ok, other=0)
    acc = tl.zeros((BLOCK_P,), ACC)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        m = ok[:, None] & (offs_d[None, :] < D)
        a = tl.load(x_ptr + ri[:, None] * stride_x + offs_d[None, :], mask=m, other=0.0)
        b = tl.load(r_ptr + ci[:, None] * stride_r + offs_d[None, :], mask=m, other=0.0)
        acc += tl.sum(a.to(ACC) * b.to(ACC), axis=1)
    tl.store(out_ptr + offs_p, acc, mask=ok)


@triton.jit
def _sims_bwd_kernel(g_ptr, x_ptr, r_ptr, rows_ptr, cols_ptr, dx_ptr, dr_ptr, P, D, stride_x,
                     stride_r, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    ok = offs_p < P
    ri = tl.load(rows_ptr + offs_p, mask=ok, other=0)
    ci = tl.load(cols_ptr + offs_p, mask=ok, other=0)
    g = tl.load(g_ptr + offs_p, mask=ok, other=0.0).to(ACC)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        m = ok[:, None] & (offs_d[None, :] < D)
        a = tl.load(x_ptr + ri[:, None] * stride_x + offs_d[None, :], mask=m, other=0.0)
        b = tl.load(r_ptr + ci[:, None] * stride_r + offs_d[None, :], mask=m, other=0.0)
        tl.atomic_add(dx_ptr + ri[:, None] * stride_x + offs_d[None, :], g[:, None] * b.to(ACC),
                      mask=m)
        tl.atomic_add(dr_ptr + ci[:, None] * stride_r + offs_d[None, :], g[:, None] * a.to(ACC),
                      mask=m)


def _check(x, r, rows, cols):
    """The checks of the CPU kernel (csrc/cpu/pair_sims_cpu.cpp), since the ops can be called
    without the Python wrapper: dtypes, shapes, and every index in range (the range by an
    asynchronous device assert: no host sync)."""
    if x.dtype not in (torch.float32, torch.float64) or r.dtype != x.dtype:
        raise TypeError(f"x and r must both be float32 or float64, got {x.dtype} and {r.dtype}")
    if x.dim() != 2 or r.dim() != 2 or x.shape[1] != r.shape[1]:
        raise ValueError(f"x and r must be 2-D with the same width, got {tuple(x.shape)} and "
                         f"{tuple(r.shape)}")
    if (rows.dtype != torch.int64 or cols.dtype != torch.int64 or rows.dim() != 1
            or cols.shape != rows.shape):
        raise ValueError("rows and cols must be 1-D int64 tensors of one length, got "
                         f"{rows.dtype} {tuple(rows.shape)} and {cols.dtype} {tuple(cols.shape)}")
    if rows.numel() > 0:
        torch._assert_async(((rows >= 0) & (rows < x.shape[0])).all()
                            & ((cols >= 0) & (cols < r.shape[0])).all(),
                            "pair_sims: rows must be in [0, len(x)) and cols in [0, len(r))")


def _alert_not_deterministic(caller: str):
    """The atomic adds' order is the GPU's: under torch.use_deterministic_algorithms(True)
    this raises (or, with warn_only, warns), as torch's own nondeterministic kernels do."""
    if not torch.are_deterministic_algorithms_enabled():
        return
    msg = (f"{caller} does not have a deterministic implementation, but you set "
           "'torch.use_deterministic_algorithms(True)'")
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(msg, UserWarning, stacklevel=3)
    else:
        raise RuntimeError(msg)


def _blocks(d: int):
    return dict(BLOCK_P=32, BLOCK_D=max(16, min(128, triton.next_power_of_2(d))))


def pair_sims_triton(x, r, rows, cols):
    """x[rows_k] · r[cols_k] per pair, in x's dtype (fp32 or fp64 rows, int64 indices)."""
    _check(x, r, rows, cols)
    x, r, rows, cols = x.contiguous(), r.contiguous(), rows.contiguous(), cols.contiguous()
    p, d = rows.shape[0], x.shape[1]
    out = torch.empty(p, dtype=x.dtype, device=x.device)
    if p > 0:
        cfg = _blocks(d)
        _sims_fwd_kernel[(triton.cdiv(p, cfg["BLOCK_P"]),)](
            x, r, rows, cols, out, p, d, x.stride(0), r.stride(0), ACC=acc_dtype(x.dtype), **cfg)
    return out


def pair_sims_bwd_triton(grad, x, r, rows, cols):
    """(dx, dr) of Σ_k grad_k s_k."""
    _check(x, r, rows, cols)
    if grad.shape != rows.shape:
        raise ValueError(f"grad must have one entry per pair, got {tuple(grad.shape)} for "
                         f"{rows.shape[0]} pairs")
    _alert_not_deterministic("pair_sims_bwd (Triton, CUDA)")
    x, r, rows, cols = x.contiguous(), r.contiguous(), rows.contiguous(), cols.contiguous()
    p, d = rows.shape[0], x.shape[1]
    dx, dr = torch.zeros_like(x), torch.zeros_like(r)
    if p > 0:
        cfg = _blocks(d)
        _sims_bwd_kernel[(triton.cdiv(p, cfg["BLOCK_P"]),)](
            grad.to(x.dtype).contiguous(), x, r, rows, cols, dx, dr, p, d, x.stride(0),
            r.stride(0), ACC=acc_dtype(x.dtype), **cfg)
    return dx, dr


if HAS_OP:
    # the extension's ops get these as their CUDA kernels where the build has none of its own
    # (a CPU-only build on a GPU machine); a CUDA build's (csrc/cuda/pair_sims_cuda.cu,
    # deterministic) serve both GPU engines' tuple paths
    if not _ext.has_cuda_kernel("pair_sims_fwd"):
        _LIB = torch.library.Library("metrix_ops", "IMPL")
        _LIB.impl("pair_sims_fwd", pair_sims_triton, "CUDA")
        _LIB.impl("pair_sims_bwd", pair_sims_bwd_triton, "CUDA")

    def _on_cuda(supports):
        def cuda_supports(params, inp, expansion) -> bool:
            dev = inp.embeddings.device
            return dev.type == "cuda" and usable_on(dev) and supports(params, inp, expansion)
        return cuda_supports

    # the losses whose listed-pairs path needs nothing but pair_sims (NPairs and ProxyNCA
    # run their tuples on the ProxyNCA op instead); the impls keep fused/indices' rule that
    # a tuple listing most pairs runs dense
    for (_backend, _name), (_supports, _impl) in list(fused.INDICES_IMPLS.items()):
        if _backend == "cpu" and _name not in ("NPairsLoss", "ProxyNCALoss"):
            fused.register_indices("triton", _name, _on_cuda(_supports), _impl)
