"""sim_row_stats: per-row max, argmax and logsumexp of S = scale · x̂ r̂ᵀ without the B×M matrix.

The building block of the fused engine (online statistics over streamed similarity
chunks) and of chunked nearest-neighbour search. Gradients flow from the logsumexp
output: dL/dS = g · softmax(S) row-wise, recomputed chunk by chunk in backward, then
dx̂ = dS r̂, dr̂ = dSᵀ x̂ and the chain rule through the normalisation.
"""
from __future__ import annotations

import math

import torch

from .. import _ext
from .autograd import call, register_autograd

_OP = "metrix_ops::sim_row_stats"


def _acc_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _is_compiling() -> bool:
    # Under torch.compile the data-dependent NaN/Inf check would be a graph break.
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # torch < 2.3
        return False


def _check(t, name: str) -> None:
    if not torch.is_tensor(t):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows, dim), got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.shape[1] == 0:
        raise ValueError(f"{name} has dim 0, got shape {tuple(t.shape)}")
    if not _is_compiling() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")


if _ext.HAS_EXT:
    @torch.library.register_fake(_OP)
    def _fake(x, r, scale, chunk):
        b = x.shape[0]
        acc = _acc_dtype(x)
        return x.new_empty(b, dtype=acc), x.new_empty(b, dtype=torch.long), x.new_empty(b, dtype=acc)

    def _setup_context(ctx, inputs, output):
        x, r, scale, chunk = inputs
        ctx.save_for_backward(x, r, output[2])
        ctx.scale, ctx.chunk = scale, chunk
        # Only the logsumexp has a gradient; marking the max keeps a silent zero gradient
        # from reaching a user who backpropagates through it.
        ctx.mark_non_differentiable(output[0], output[1])

    def _normalize_backward(v, v_hat, norm, grad_hat):
        # d/dv of v/‖v‖ applied to grad_hat: (g − v̂ (v̂·g)) / ‖v‖. Rows under the eps clamp
        # are treated like the others; their gradient is that of a vector of norm eps.
        return (grad_hat - v_hat * (v_hat * grad_hat).sum(1, keepdim=True)) / norm

    def _backward(ctx, g_max, g_arg, g_lse):
        x, r, lse = ctx.saved_tensors
        if g_lse is None:
            return None, None, None, None
        acc = _acc_dtype(x)
        xa, ra = x.to(acc), r.to(acc)
        xn = xa.norm(dim=1, keepdim=True).clamp_min(1e-12)
        rn = ra.norm(dim=1, keepdim=True).clamp_min(1e-12)
        xh, rh = xa / xn, ra / rn
        gx = torch.zeros_like(xh)
        gr = torch.zeros_like(rh)
        g = g_lse.to(acc)[:, None]
        lse_col = lse.to(acc)[:, None]
        # Recompute S chunk by chunk: keeping it from forward would be the B×M memory the
        # op exists to avoid. Plain torch ops, so double backward works too.
        for start in range(0, rh.shape[0], ctx.chunk):
            rc = rh[start:start + ctx.chunk]
            s = ctx.scale * (xh @ rc.t())
            ds = g * torch.exp(s - lse_col) * ctx.scale  # g · softmax(S) · dS/d(x̂r̂ᵀ)
            gx += ds @ rc
            gr[start:start + ctx.chunk] = ds.t() @ xh
        dx = _normalize_backward(xa, xh, xn, gx).to(x.dtype)
        dr = _normalize_backward(ra, rh, rn, gr).to(r.dtype)
        return dx, dr, None, None

    # the backward is PyTorch ops: differentiable again (test_row_stats_op's gradgradcheck)
    register_autograd(_OP, _backward, setup_context=_setup_context, differentiable_backward=True)


def sim_row_stats(x: torch.Tensor, r: torch.Tensor | None = None, scale: float = 1.0,
                  chunk: int = 1024):
    """(row_max, row_argmax, row_lse) of scale · normalize(x) @ normalize(r)ᵀ; r=None means r=x.

    Outputs are fp32 (fp64 for fp64 inputs); ties in argmax go to the lowest index; a row
    over an empty r gives max −inf, argmax −1, lse −inf. Only row_lse is differentiable.
    Memory is O((B + chunk)·D + B·chunk): r is streamed in chunks of `chunk` rows.
    """
    _check(x, "x")
    if r is None:
        r = x
    else:
        _check(r, "r")
        if r.shape[1] != x.shape[1]:
            raise ValueError(f"r has dim {r.shape[1]} but x has dim {x.shape[1]}")
        if r.device != x.device:
            raise ValueError(f"r is on {r.device} but x is on {x.device}")
        if r.dtype != x.dtype:
            raise TypeError(f"r has dtype {r.dtype} but x has dtype {x.dtype}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python float, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    # After the argument checks, so a wrong argument is reported as such even without the
    # extension; here the device decides which kernels are needed.
    _ext.require_ext("cuda" if x.is_cuda else "cpu")
    return call(torch.ops.metrix_ops.sim_row_stats, x, r, float(scale), chunk)
