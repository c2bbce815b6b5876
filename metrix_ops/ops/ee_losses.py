"""The negative side of the Embedding Expansion losses over every (anchor, negative point)
pair (csrc/cpu/ee_losses_cpu.cpp): the op wrapper, its fake kernels for torch.compile and its
autograd. Inputs are unit rows; the normalisation and its gradient stay in PyTorch."""
from __future__ import annotations

import torch

from .. import _ext

_FWD = "metrix_ops::ee_neg_lse_fwd"

if _ext.HAS_EXT:
    @torch.library.register_fake(_FWD)
    def _fake(x, labels, seg_i, seg_j, anchor_mask, neg_mask, n_points, l2, scale, offset,
              chunk):
        return x.new_empty(x.shape[0])

    @torch.library.register_fake("metrix_ops::ee_neg_lse_bwd")
    def _fake_bwd(grad, lse, x, labels, seg_i, seg_j, anchor_mask, neg_mask, n_points, l2,
                  scale, offset, chunk):
        return torch.empty_like(x)

    def _setup_context(ctx, inputs, output):
        x, labels, seg_i, seg_j, anchor_mask, neg_mask = inputs[:6]
        ctx.save_for_backward(output, x, labels, seg_i, seg_j, anchor_mask, neg_mask)
        ctx.args = inputs[6:]

    def _backward(ctx, grad):
        lse, *tensors = ctx.saved_tensors
        dx = torch.ops.metrix_ops.ee_neg_lse_bwd(grad.contiguous(), lse, *tensors, *ctx.args)
        return (dx,) + (None,) * 10

    torch.library.register_autograd(_FWD, _backward, setup_context=_setup_context)


def ee_neg_lse(x_unit: torch.Tensor, labels: torch.Tensor, seg_i: torch.Tensor,
               seg_j: torch.Tensor, n_points: int, l2: bool, scale: float, offset: float,
               anchor_mask: torch.Tensor | None = None, neg_mask: torch.Tensor | None = None,
               chunk: int = 256) -> torch.Tensor:
    """(B,) log Σ_{q ∈ Q_i} exp(scale·m̂(i, q) + offset) per anchor (−inf: no term), m̂ the
    hard-negative-pair cosine ŝ or (l2) L2 distance d̂; anchor_mask: the anchors computed (the
    rest get −inf), neg_mask: the originals that may be negatives (synthetic points always
    are). Differentiable in x_unit."""
    b = x_unit.shape[0]
    ones = torch.ones(b, dtype=torch.bool, device=x_unit.device)
    return torch.ops.metrix_ops.ee_neg_lse_fwd(
        x_unit.contiguous(), labels.long().contiguous(), seg_i.long().contiguous(),
        seg_j.long().contiguous(), ones if anchor_mask is None else anchor_mask.contiguous(),
        ones if neg_mask is None else neg_mask.contiguous(), int(n_points), bool(l2),
        float(scale), float(offset), int(chunk))
