"""sim_row_stats: per-row max, argmax and logsumexp of S = scale · x̂ r̂ᵀ without the B×M matrix.

The building block of the fused engine (online statistics over streamed similarity
chunks) and of chunked nearest-neighbour search. Gradients flow from the logsumexp
output: dL/dS = g · softmax(S) row-wise, recomputed chunk by chunk in backward, then
dx̂ = dS r̂, dr̂ = dSᵀ x̂ and the chain rule through the normalisation.
"""
from __future__ import annotations

import torch

from .. import _ext
from ..validation import check_embeddings

_OP = "metrix_ops::sim_row_stats"


def _acc_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


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

    def _normalize_backward(v, v_hat, norm, grad_hat):
        # d/dv of v/‖v‖ applied to grad_hat: (g − v̂ (v̂·g)) / ‖v‖
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
        for start in range(0, rh.shape[0], ctx.chunk):
            rc = rh[start:start + ctx.chunk]
            s = ctx.scale * (xh @ rc.t())
            ds = g * torch.exp(s - lse.to(acc)[:, None]) * ctx.scale  # softmax · g · scale
            gx += ds @ rc
            gr[start:start + ctx.chunk] = ds.t() @ xh
        dx = _normalize_backward(xa, xh, xn, gx).to(x.dtype)
        dr = _normalize_backward(ra, rh, rn, gr).to(r.dtype)
        return dx, dr, None, None

    torch.library.register_autograd(_OP, _backward, setup_context=_setup_context)


def sim_row_stats(x: torch.Tensor, r: torch.Tensor | None = None, scale: float = 1.0,
                  chunk: int = 1024):
    """(row_max, row_argmax, row_lse) of scale · normalize(x) @ normalize(r)ᵀ; r=None means r=x.

    Outputs are fp32 (fp64 for fp64 inputs); ties in argmax go to the lowest index; a row
    over an empty r gives max −inf, argmax −1, lse −inf.
    """
    _ext.require_ext("cuda" if torch.is_tensor(x) and x.is_cuda else "cpu")
    check_embeddings(x, "x")
    if r is None:
        r = x
    else:
        check_embeddings(r, "r", allow_empty=True)
        if r.shape[1] != x.shape[1]:
            raise ValueError(f"r has dim {r.shape[1]} but x has {x.shape[1]}")
        if r.device != x.device:
            raise ValueError(f"r is on {r.device} but x is on {x.device}")
        if r.dtype != x.dtype:
            raise TypeError(f"r has dtype {r.dtype} but x has {x.dtype}")
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    return torch.ops.metrix_ops.sim_row_stats(x.contiguous(), r.contiguous(), float(scale), chunk)
