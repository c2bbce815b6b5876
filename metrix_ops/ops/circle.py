"""CircleLoss rows from the fused streaming op (csrc/cpu/circle_cpu.cpp): fake kernel for
torch.compile, autograd, and the call. Inputs are unit rows: normalisation and its gradient
stay in PyTorch; the same tensor as x and r (the batch against itself) gets both gradients."""
from __future__ import annotations

import torch

from .. import _ext
from .ntxent import _input_grads, _row_grad
from .proxy_anchor import default_chunk

_FWD = "metrix_ops::circle_fwd"

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

    torch.library.register_autograd(_FWD, _backward, setup_context=_setup)


def circle_rows(x_unit, r_unit, labels, ref_labels, exclude_diag: bool, m: float,
                gamma: float, chunk=None):
    """Per-anchor CircleLoss terms (0 for an anchor lacking a positive or a negative)."""
    chunk = default_chunk(r_unit.shape[0]) if chunk is None else chunk
    rows, _, _ = torch.ops.metrix_ops.circle_fwd(
        x_unit.contiguous(), r_unit.contiguous(), labels.contiguous(), ref_labels.contiguous(),
        bool(exclude_diag), float(m), float(gamma), int(chunk))
    return rows
