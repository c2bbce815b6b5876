"""The norms of Embedding Expansion's synthetic points, differentiable, as one Triton kernel
each way (the Triton EE losses' ee_neg_lse divides by them). Per segment e = (u, w) of unit
rows and its points k = 1..n, λ = k/(n+1) (the reference's float64 grid, rounded to the rows'
dtype):

    ‖p_ek‖ = √max(λ(λ g_uu + μ g_uw) + μ(λ g_uw + μ g_ww), tiny),  μ = 1 − λ,

g the segment's three row dots (the association of the CPU op and of the PyTorch form this
replaces, which took about 45 launches forward and backward: gathers, dots, an index per
entry, and their autograd). Output: the S·n norms, segment-major, then a trailing 1 (so that
the table is never empty). Backward: per segment ∂g from its points' ∂norm (none where the
clamp acts), then its two rows' gradients (2 g_uu x_u + g_uw x_w, and the like) into a
2S × D buffer that one index_add_ sums into dX (rows are shared by many segments).
Sums in fp32 (fp64 for fp64 rows)."""
from __future__ import annotations

import torch

from ..ops.autograd import call, register_autograd
from .launch import HAS_TRITON, next_pow2, triton_op
from .tiles import acc_dtype

_FWD = "metrix_ops::triton_segment_norms"
_BWD = "metrix_ops::triton_segment_norms_bwd"

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _segment_rows(x_ptr, segs, in_s, d0, D, stride, BLOCK_D: tl.constexpr,
                      ACC: tl.constexpr):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = in_s[:, None] & (cols[None, :] < D)
        v = tl.load(x_ptr + segs.to(tl.int64)[:, None] * stride + cols[None, :], mask=mask,
                    other=0.0)
        return v.to(ACC), cols, mask

    @triton.jit
    def _dots(x_ptr, u, w, in_s, D, stride, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
              ACC: tl.constexpr):
        g_uu = tl.zeros((BLOCK_S,), ACC)
        g_uw = tl.zeros((BLOCK_S,), ACC)
        g_ww = tl.zeros((BLOCK_S,), ACC)
        for d0 in range(0, D, BLOCK_D):
            xu, _, _ = _segment_rows(x_ptr, u, in_s, d0, D, stride, BLOCK_D, ACC)
            xw, _, _ = _segment_rows(x_ptr, w, in_s, d0, D, stride, BLOCK_D, ACC)
            g_uu += tl.sum(xu * xu, 1)
            g_uw += tl.sum(xu * xw, 1)
            g_ww += tl.sum(xw * xw, 1)
        return g_uu, g_uw, g_ww

    @triton.jit
    def _lam(k, n, DT: tl.constexpr, ACC: tl.constexpr):
        """λ = k/(n+1) in float64, rounded to DT (through fp32 for half: the interpreter's
        direct fp64 → bf16 cast is wrong), then ACC."""
        lam = tl.cast(k + 1, tl.float64) / tl.cast(n + 1, tl.float64)
        if ACC != tl.float64:
            lam = lam.to(tl.float32)
        return lam.to(DT).to(ACC)

    @triton.jit
    def _sq(lam, g_uu, g_uw, g_ww):
        mu = 1.0 - lam
        return lam * (lam * g_uu + mu * g_uw) + mu * (lam * g_uw + mu * g_ww)

    @triton.jit
    def _norms_fwd_kernel(x_ptr, u_ptr, w_ptr, out_ptr, S, D, stride, n, TINY: tl.constexpr,
                          DT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                          ACC: tl.constexpr):
        pid = tl.program_id(0)
        segs = pid * BLOCK_S + tl.arange(0, BLOCK_S)
        in_s = segs < S
        u = tl.load(u_ptr + segs, mask=in_s, other=0)
        w = tl.load(w_ptr + segs, mask=in_s, other=0)
        g_uu, g_uw, g_ww = _dots(x_ptr, u, w, in_s, D, stride, BLOCK_S, BLOCK_D, ACC)
        tiny = tl.full((), TINY, ACC)
        at = segs.to(tl.int64) * n
        for k in range(0, n):
            sq = _sq(_lam(k, n, DT, ACC), g_uu, g_uw, g_ww)
            tl.store(out_ptr + at + k, tl.sqrt(tl.maximum(sq, tiny)), mask=in_s)
        if pid == 0:  # the trailing 1
            tl.store(out_ptr + tl.cast(S, tl.int64) * n, tl.full((), 1.0, ACC))

    @triton.jit
    def _norms_bwd_kernel(g_ptr, x_ptr, u_ptr, w_ptr, buf_ptr, dst_ptr, S, D, stride, n,
                          TINY: tl.constexpr, DT: tl.constexpr, BLOCK_S: tl.constexpr,
                          BLOCK_D: tl.constexpr, ACC: tl.constexpr):
        """Per segment its two rows' gradients into buf rows 2e (u) and 2e + 1 (w), and those
        rows into dst."""
        segs = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
        in_s = segs < S
        u = tl.load(u_ptr + segs, mask=in_s, other=0)
        w = tl.load(w_ptr + segs, mask=in_s, other=0)
        g_uu, g_uw, g_ww = _dots(x_ptr, u, w, in_s, D, stride, BLOCK_S, BLOCK_D, ACC)
        tiny = tl.full((), TINY, ACC)
        d_uu = tl.zeros((BLOCK_S,), ACC)
        d_uw = tl.zeros((BLOCK_S,), ACC)
        d_ww = tl.zeros((BLOCK_S,), ACC)
        at = segs.to(tl.int64) * n
        for k in range(0, n):
            lam = _lam(k, n, DT, ACC)
            mu = 1.0 - lam
            sq = _sq(lam, g_uu, g_uw, g_ww)
            gn = tl.load(g_ptr + at + k, mask=in_s, other=0.0).to(ACC)
            # ∂√sq = 1/(2√sq), and nothing through the clamp where it acts
            d_sq = tl.where(sq >= tiny, gn / (2.0 * tl.sqrt(tl.maximum(sq, tiny))), 0.0)
            d_uu += d_sq * (lam * lam)
            d_uw += d_sq * (lam * mu + mu * lam)
            d_ww += d_sq * (mu * mu)
        e2 = segs.to(tl.int64) * 2
        tl.store(dst_ptr + e2, u.to(tl.int64), mask=in_s)
        tl.store(dst_ptr + e2 + 1, w.to(tl.int64), mask=in_s)
        for d0 in range(0, D, BLOCK_D):
            xu, cols, mask = _segment_rows(x_ptr, u, in_s, d0, D, stride, BLOCK_D, ACC)
            xw, _, _ = _segment_rows(x_ptr, w, in_s, d0, D, stride, BLOCK_D, ACC)
            row = buf_ptr + e2[:, None] * D + cols[None, :]
            tl.store(row, (2.0 * d_uu)[:, None] * xu + d_uw[:, None] * xw, mask=mask)
            tl.store(row + D, (2.0 * d_ww)[:, None] * xw + d_uw[:, None] * xu, mask=mask)


def _launch(kernel, xs, *tensors, s: int, n: int):
    """kernel(*tensors, S, D, xs's row stride, n) over blocks of 16 segments, 64 features a
    step at most (ptxas for sm_90, 4 warps: no spills; 219–255 registers at 128)."""
    d = xs.shape[1]
    wide = xs.dtype == torch.float64
    kernel[(triton.cdiv(s, 16),)](
        *tensors, s, d, xs.stride(0), int(n),
        TINY=torch.finfo(torch.float64 if wide else torch.float32).tiny,
        DT=getattr(tl, str(xs.dtype).split(".")[1]), BLOCK_S=16,
        BLOCK_D=max(16, min(64, next_pow2(d))), ACC=acc_dtype(xs.dtype))


def _count(seg_u, n: int) -> int:
    return seg_u.shape[0] if n > 0 else 0


def _contiguous_rows(xs):
    return xs if xs.stride(1) == 1 else xs.contiguous()


@triton_op(_FWD)
def _fwd_op(xs: torch.Tensor, seg_u: torch.Tensor, seg_w: torch.Tensor, n: int
            ) -> torch.Tensor:
    s = _count(seg_u, n)
    if s == 0:
        return torch.ones(1, dtype=xs.dtype, device=xs.device)
    out = torch.empty(s * n + 1, dtype=xs.dtype, device=xs.device)
    _launch(_norms_fwd_kernel, xs, _contiguous_rows(xs), seg_u.contiguous(), seg_w.contiguous(),
            out, s=s, n=n)
    return out


@_fwd_op.register_fake
def _(xs, seg_u, seg_w, n):
    return xs.new_empty(_count(seg_u, n) * n + 1)


@triton_op(_BWD)
def _bwd_op(grad: torch.Tensor, xs: torch.Tensor, seg_u: torch.Tensor, seg_w: torch.Tensor,
            n: int) -> torch.Tensor:
    s, d = _count(seg_u, n), xs.shape[1]
    dx = torch.zeros_like(xs)
    if s == 0:
        return dx
    xs = _contiguous_rows(xs)
    buf = torch.empty((2 * s, d), dtype=xs.dtype, device=xs.device)
    dst = torch.empty(2 * s, dtype=torch.long, device=xs.device)
    _launch(_norms_bwd_kernel, xs, grad.to(xs.dtype).contiguous(), xs, seg_u.contiguous(),
            seg_w.contiguous(), buf, dst, s=s, n=n)
    return dx.index_add_(0, dst, buf)


@_bwd_op.register_fake
def _(grad, xs, seg_u, seg_w, n):
    return torch.empty_like(xs)


def _setup(ctx, inputs, output):
    xs, seg_u, seg_w, n = inputs
    ctx.save_for_backward(xs, seg_u, seg_w)
    ctx.n = n


def _backward(ctx, grad):
    xs, seg_u, seg_w = ctx.saved_tensors
    return (torch.ops.metrix_ops.triton_segment_norms_bwd(grad, xs, seg_u, seg_w, ctx.n),
            None, None, None)


register_autograd(_FWD, _backward, setup_context=_setup)


def segment_norms_triton(xs, seg_u, seg_w, n: int) -> torch.Tensor:
    """‖λ x̂_u + (1−λ) x̂_w‖ of the n points of each segment (seg_u, seg_w rows of xs),
    segment-major, then a trailing 1; differentiable in xs."""
    return call(torch.ops.metrix_ops.triton_segment_norms, xs, seg_u, seg_w, int(n))
