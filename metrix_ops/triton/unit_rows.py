"""Row normalisation (ops/unit_rows.py's forward and backward) as one Triton kernel each, for
CUDA tensors. In PyTorch the forward is three launches (norm, clamp, divide) and the backward
seven (a row dot, a mask, a fused multiply-add, a clamp, a divide...): small element-wise
kernels whose fixed cost, paid for the embeddings and again for the proxies or references,
is a share of a loss call at B = 8192 that the products do not amortise. Here a program owns a
block of rows and streams their features twice: once for the row reduction (‖x‖², or g·y),
once to write the result.

    forward:  norm = ‖x‖,  y = x / max(norm, eps)
    backward: dx = (g − y (g·y)) / max(norm, eps), with g·y taken as 0 where norm < eps
              (F.normalize's clamp passes no gradient to the norm there)

Sums in fp32 (fp64 for fp64 rows). Registered as custom ops, so a compiled module traces
through them. Tested against the PyTorch form under TRITON_INTERPRET=1 on the CPU."""
from __future__ import annotations


import torch

from .launch import HAS_TRITON, next_pow2, triton_op
from .tiles import acc_dtype

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _tile(ptr, rows, in_r, d0, D, stride, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
        """Features [d0, d0 + BLOCK_D) of `rows` (in ACC, 0 outside), their offsets from a
        contiguous B × D output, and the mask."""
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = in_r[:, None] & (cols[None, :] < D)
        r64 = rows.to(tl.int64)[:, None]  # B·D may pass 2^31 (a large bank of references)
        v = tl.load(ptr + r64 * stride + cols[None, :], mask=mask, other=0.0)
        return v.to(ACC), r64 * D + cols[None, :], mask

    @triton.jit
    def _unit_rows_fwd_kernel(x_ptr, y_ptr, norm_ptr, B, D, stride_x,
                              BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
        eps = tl.full((), 1e-12, ACC)  # F.normalize's, in ACC (a float argument is fp32)
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        in_r = rows < B
        sq = tl.zeros((BLOCK_R,), dtype=ACC)
        for d0 in range(0, D, BLOCK_D):
            v, _, _ = _tile(x_ptr, rows, in_r, d0, D, stride_x, BLOCK_D, ACC)
            sq += tl.sum(v * v, 1)
        norm = tl.sqrt(sq)
        inv = 1.0 / tl.maximum(norm, eps)
        for d0 in range(0, D, BLOCK_D):
            v, out, mask = _tile(x_ptr, rows, in_r, d0, D, stride_x, BLOCK_D, ACC)
            tl.store(y_ptr + out, v * inv[:, None], mask=mask)
        tl.store(norm_ptr + rows, norm, mask=in_r)

    @triton.jit
    def _unit_rows_bwd_kernel(g_ptr, y_ptr, norm_ptr, dx_ptr, B, D, stride_g,
                              BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
        eps = tl.full((), 1e-12, ACC)
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        in_r = rows < B
        dot = tl.zeros((BLOCK_R,), dtype=ACC)
        for d0 in range(0, D, BLOCK_D):
            g, _, _ = _tile(g_ptr, rows, in_r, d0, D, stride_g, BLOCK_D, ACC)
            y, _, _ = _tile(y_ptr, rows, in_r, d0, D, D, BLOCK_D, ACC)
            dot += tl.sum(g * y, 1)
        norm = tl.load(norm_ptr + rows, mask=in_r, other=1.0).to(ACC)
        dot = tl.where(norm < eps, 0.0, dot)
        inv = 1.0 / tl.maximum(norm, eps)
        for d0 in range(0, D, BLOCK_D):
            g, _, _ = _tile(g_ptr, rows, in_r, d0, D, stride_g, BLOCK_D, ACC)
            y, out, mask = _tile(y_ptr, rows, in_r, d0, D, D, BLOCK_D, ACC)
            tl.store(dx_ptr + out, (g - y * dot[:, None]) * inv[:, None], mask=mask)


def _blocks(d: int):
    """(rows, features) per program: a 16 × 256-wide tile at most (4 K values), the whole
    row when it fits."""
    block_d = max(16, min(256, next_pow2(d)))
    return max(1, min(16, 4096 // block_d)), block_d


def _launch(kernel, first, *rest, dtype):
    """kernel(first, *rest, B, D, first's row stride): `first` (x, or g) is read with its own
    row stride, the others are contiguous."""
    b, d = first.shape
    block_r, block_d = _blocks(d)
    # (on the tensors' device: the ops run with it current, launch.triton_op)
    kernel[(triton.cdiv(b, block_r),)](first, *rest, b, d, first.stride(0),
                                       BLOCK_R=block_r, BLOCK_D=block_d, ACC=acc_dtype(dtype))


def _unit_stride(t):
    return t if t.stride(1) == 1 else t.contiguous()


@triton_op("metrix_ops::triton_unit_rows_fwd")
def unit_rows_fwd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / max(‖x‖, eps), ‖x‖ as a B × 1 column), the rows of x normalised."""
    b, d = x.shape
    y = torch.empty((b, d), dtype=x.dtype, device=x.device)
    norm = torch.empty((b, 1), dtype=x.dtype, device=x.device)
    if b:
        _launch(_unit_rows_fwd_kernel, _unit_stride(x), y, norm, dtype=x.dtype)
    return y, norm


@unit_rows_fwd.register_fake
def _(x):
    return x.new_empty(x.shape), x.new_empty((x.shape[0], 1))


@triton_op("metrix_ops::triton_unit_rows_bwd")
def unit_rows_bwd(g: torch.Tensor, y: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """The gradient of x from the gradient g of y = unit_rows_fwd(x)[0]."""
    b, d = y.shape
    dx = torch.empty((b, d), dtype=y.dtype, device=y.device)
    if b:
        _launch(_unit_rows_bwd_kernel, _unit_stride(g), y.contiguous(), norm.contiguous(), dx,
                dtype=y.dtype)
    return dx


@unit_rows_bwd.register_fake
def _(g, y, norm):
    return y.new_empty(y.shape)
