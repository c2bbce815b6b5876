"""Similarities of listed pairs from the fused op (csrc/cpu/pair_sims_cpu.cpp): fake kernel
for torch.compile, autograd, and the call. s_k = x[rows_k] · r[cols_k] with no B×M matrix
and no P×D gather; the caller normalises (and differentiates the normalisation) in PyTorch."""
from __future__ import annotations

import torch

from .. import _ext
from .autograd import call, register_autograd

_FWD = "metrix_ops::pair_sims_fwd"

# without the op (no build, or a stale one) the indices_tuple calls take the reference path
HAS_OP = _ext.has_op("pair_sims_fwd")

if HAS_OP:
    @torch.library.register_fake(_FWD)
    def _fake(x, r, rows, cols):
        return x.new_empty(rows.shape[0])

    @torch.library.register_fake("metrix_ops::pair_sims_bwd")
    def _fake_bwd(grad, x, r, rows, cols):
        return torch.empty_like(x), torch.empty_like(r)

    def _setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _backward(ctx, grad):
        x, r, rows, cols = ctx.saved_tensors
        dx, dr = torch.ops.metrix_ops.pair_sims_bwd(grad.contiguous(), x, r, rows, cols)
        return dx, dr, None, None

    register_autograd(_FWD, _backward, setup_context=_setup_context)


def pair_sims(x, r, rows, cols):
    """x[rows_k] · r[cols_k] for each listed pair k (int64 index vectors of one length)."""
    return call(torch.ops.metrix_ops.pair_sims_fwd, x.contiguous(), r.contiguous(),
                rows.contiguous(), cols.contiguous())
