"""The negative side of the Embedding Expansion losses over every (anchor, negative point)
pair (csrc/cpu/ee_losses_cpu.cpp; on CUDA tensors csrc/cuda/ee_losses_cuda.cu): the op
wrapper, its fake kernels for torch.compile and its autograd. Inputs are unit rows; the
normalisation and its gradient stay in PyTorch."""
from __future__ import annotations

import torch

from .. import _ext
from .autograd import call, register_autograd

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

    register_autograd(_FWD, _backward, setup_context=_setup_context)


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
    return call(torch.ops.metrix_ops.ee_neg_lse_fwd,
        x_unit.contiguous(), labels.long().contiguous(), seg_i.long().contiguous(),
        seg_j.long().contiguous(), ones if anchor_mask is None else anchor_mask.contiguous(),
        ones if neg_mask is None else neg_mask.contiguous(), int(n_points), bool(l2),
        float(scale), float(offset), int(chunk))


_TRIP = "metrix_ops::ee_triplet_fwd"

if _ext.HAS_EXT:
    @torch.library.register_fake(_TRIP)
    def _fake_trip(x, labels, seg_i, seg_j, pos, n_points, l2, margin, smooth, chunk):
        b = x.shape[0]
        return x.new_empty(b), labels.new_empty(b), labels.new_empty(b)

    @torch.library.register_fake("metrix_ops::ee_triplet_bwd")
    def _fake_trip_bwd(grad, x, labels, seg_i, seg_j, pos, n_points, l2, margin, smooth, chunk):
        return torch.empty_like(x), torch.empty_like(pos)

    def _setup_trip(ctx, inputs, output):
        x, labels, seg_i, seg_j, pos = inputs[:5]
        ctx.save_for_backward(x, labels, seg_i, seg_j, pos)
        ctx.args = inputs[5:]
        ctx.mark_non_differentiable(output[1], output[2])

    def _backward_trip(ctx, grad, _g_nonzero, _g_count):
        dx, dpos = torch.ops.metrix_ops.ee_triplet_bwd(grad.contiguous(), *ctx.saved_tensors,
                                                       *ctx.args)
        return dx, None, None, None, dpos, None, None, None, None, None

    register_autograd(_TRIP, _backward_trip, setup_context=_setup_trip)


def ee_triplet(x_unit: torch.Tensor, labels: torch.Tensor, seg_i: torch.Tensor,
               seg_j: torch.Tensor, pos: torch.Tensor, n_points: int, l2: bool, margin: float,
               smooth: bool, chunk: int = 256):
    """TripletMarginLoss "all" with EE, per anchor: (Σ f(v) over (p, q), #f > 0, #triplets),
    v = margin(pos_ip, m̂(i, q)) + margin, f relu or softplus (smooth); `pos`: each anchor's
    clean metric to its positives (other class members, index order), anchor-major.
    Differentiable in x_unit and pos."""
    return call(torch.ops.metrix_ops.ee_triplet_fwd,
        x_unit.contiguous(), labels.long().contiguous(), seg_i.long().contiguous(),
        seg_j.long().contiguous(), pos.contiguous(), int(n_points), bool(l2), float(margin),
        bool(smooth), int(chunk))
