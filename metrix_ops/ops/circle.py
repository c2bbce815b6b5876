"""CircleLoss rows from the fused streaming op (csrc/cpu/circle_cpu.cpp; the batch against
itself: circle_self_cpu.cpp): fake kernel for
torch.compile, autograd, and the call. Inputs are unit rows: normalisation and its gradient
stay in PyTorch; the same tensor as x and r (the batch against itself) gets both gradients."""
from __future__ import annotations

import torch

from .. import _ext
from .autograd import call, register_autograd
from .ntxent import _input_grads, _row_grad
from .proxy_anchor import default_chunk

_FWD = "metrix_ops::circle_fwd"
_SELF = "metrix_ops::circle_self_fwd"

if _ext.HAS_EXT:
    @torch.library.register_fake(_FWD)
    def _fake(x, r, labels, ref_labels, exclude_diag, m, gamma, chunk):
        b = x.shape[0]
        return x.new_empty(b), x.new_empty(b), x.new_empty(b)

    @torch.library.register_fake("metrix_ops::circle_bwd")
    def _fake_bwd(grad_rows, x, r, labels, ref_labels, lse_pos, lse_neg, exclude_diag, m,
                  gamma, chunk, need_dr):
        return torch.empty_like(x), torch.empty_like(r)

    def _setup(ctx, inputs, output):
        x, r, labels, ref_labels, *args = inputs
        ctx.save_for_backward(x, r, labels, ref_labels, output[1], output[2])
        ctx.args = tuple(args)
        ctx.mark_non_differentiable(output[1], output[2])

    def _backward(ctx, g_rows, _g_lp, _g_ln):
        x, r, labels, ref_labels, lse_pos, lse_neg = ctx.saved_tensors
        dx, dr = torch.ops.metrix_ops.circle_bwd(_row_grad(g_rows, lse_pos), x, r, labels,
                                                 ref_labels, lse_pos, lse_neg, *ctx.args,
                                                 bool(ctx.needs_input_grad[1]))
        return _input_grads(ctx, dx, dr, 6)

    register_autograd(_FWD, _backward, setup_context=_setup)

    # the batch against itself: one input, one gradient
    @torch.library.register_fake(_SELF)
    def _fake_self(x, labels, m, gamma, block):
        b = x.shape[0]
        return x.new_empty(b), x.new_empty(b), x.new_empty(b)

    @torch.library.register_fake("metrix_ops::circle_self_bwd")
    def _fake_self_bwd(grad_rows, x, labels, lse_pos, lse_neg, m, gamma, block):
        return torch.empty_like(x)

    def _setup_self(ctx, inputs, output):
        x, labels, *args = inputs
        ctx.save_for_backward(x, labels, output[1], output[2])
        ctx.args = tuple(args)
        ctx.mark_non_differentiable(output[1], output[2])

    def _backward_self(ctx, g_rows, _g_lp, _g_ln):
        x, labels, lse_pos, lse_neg = ctx.saved_tensors
        dx = torch.ops.metrix_ops.circle_self_bwd(_row_grad(g_rows, lse_pos), x, labels,
                                                  lse_pos, lse_neg, *ctx.args)
        return (dx,) + (None,) * 4

    register_autograd(_SELF, _backward_self, setup_context=_setup_self)


def circle_rows(x_unit, r_unit, labels, ref_labels, exclude_diag: bool, m: float,
                gamma: float, chunk=None):
    """Per-anchor CircleLoss terms (0 for an anchor lacking a positive or a negative)."""
    chunk = default_chunk(r_unit.shape[0]) if chunk is None else chunk
    rows, _, _ = call(torch.ops.metrix_ops.circle_fwd,
        x_unit.contiguous(), r_unit.contiguous(), labels.contiguous(), ref_labels.contiguous(),
        bool(exclude_diag), float(m), float(gamma), int(chunk))
    return rows


def circle_rows_self(x_unit, labels, m: float, gamma: float, block: int = 1024):
    """circle_rows of the batch against itself (self pairs excluded), from the symmetric
    blocks of S: half the products."""
    rows, _, _ = call(torch.ops.metrix_ops.circle_self_fwd, x_unit.contiguous(),
                      labels.contiguous(), float(m), float(gamma), int(block))
    return rows
