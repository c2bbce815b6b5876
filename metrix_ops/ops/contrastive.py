"""Contrastive-loss row totals from the fused streaming ops (csrc/cpu/contrastive_*): the
Python side — fake kernels for torch.compile, autograd, and the calls. Inputs are unit rows:
the normalisation and its gradient stay in PyTorch (O(B·D)).

Each op returns, per anchor, (sum of kept positive terms, their count, sum of kept negative
terms, their count), a term being kept when low < term < high (the reducer's window). The
sums are differentiable; the counts are int64 and are not."""
from __future__ import annotations

import math

import torch

from .. import _ext
from .autograd import call, register_autograd

_FWD = "metrix_ops::contrastive_fwd"
_SELF_FWD = "metrix_ops::contrastive_self_fwd"


def _row_outputs(x):
    b = x.shape[0]
    return (x.new_empty(b), x.new_empty(b, dtype=torch.long), x.new_empty(b),
            x.new_empty(b, dtype=torch.long))


def _grads(g_pos, g_neg, like):
    # an output nobody used may come back as None; the op wants both row gradients
    g_pos = torch.zeros_like(like) if g_pos is None else g_pos
    g_neg = torch.zeros_like(like) if g_neg is None else g_neg
    return g_pos.contiguous(), g_neg.contiguous()


if _ext.HAS_EXT:
    @torch.library.register_fake(_FWD)
    def _fake(x, r, labels, ref_labels, exclude_diag, cosine, pos_margin, neg_margin, low,
              high, chunk, raw=False):
        return _row_outputs(x)

    @torch.library.register_fake("metrix_ops::contrastive_bwd")
    def _fake_bwd(grad_pos, grad_neg, x, r, labels, ref_labels, exclude_diag, cosine,
                  pos_margin, neg_margin, low, high, chunk, raw=False):
        return torch.empty_like(x), torch.empty_like(r)

    def _setup(ctx, inputs, output):
        x, r, labels, ref_labels, *args = inputs
        ctx.save_for_backward(x, r, labels, ref_labels, output[0])
        ctx.args = tuple(args)
        ctx.mark_non_differentiable(output[1], output[3])

    def _backward(ctx, g_pos, _g_pc, g_neg, _g_nc):
        x, r, labels, ref_labels, like = ctx.saved_tensors
        g_pos, g_neg = _grads(g_pos, g_neg, like)
        dx, dr = torch.ops.metrix_ops.contrastive_bwd(g_pos, g_neg, x, r, labels, ref_labels,
                                                      *ctx.args)
        return (dx, dr) + (None,) * (2 + len(ctx.args))

    register_autograd(_FWD, _backward, setup_context=_setup)

    @torch.library.register_fake(_SELF_FWD)
    def _fake_self(x, labels, cosine, pos_margin, neg_margin, low, high, block, raw=False):
        return _row_outputs(x)

    @torch.library.register_fake("metrix_ops::contrastive_self_bwd")
    def _fake_self_bwd(grad_pos, grad_neg, x, labels, cosine, pos_margin, neg_margin, low,
                       high, block, raw=False):
        return torch.empty_like(x)

    def _setup_self(ctx, inputs, output):
        x, labels, *args = inputs
        ctx.save_for_backward(x, labels, output[0])
        ctx.args = tuple(args)
        ctx.mark_non_differentiable(output[1], output[3])

    def _backward_self(ctx, g_pos, _g_pc, g_neg, _g_nc):
        x, labels, like = ctx.saved_tensors
        g_pos, g_neg = _grads(g_pos, g_neg, like)
        dx = torch.ops.metrix_ops.contrastive_self_bwd(g_pos, g_neg, x, labels, *ctx.args)
        return (dx,) + (None,) * (1 + len(ctx.args))

    register_autograd(_SELF_FWD, _backward_self, setup_context=_setup_self)


def _bound(v, default):
    return default if v is None else float(v)


def contrastive_rows(x_unit, r_unit, labels, ref_labels, exclude_diag: bool, cosine: bool,
                     pos_margin: float, neg_margin: float, low=None, high=None,
                     chunk: int = 2048, raw: bool = False):
    """Per-anchor (pos_sum, pos_count, neg_sum, neg_count) of the contrastive hinge terms of
    unit anchors against unit references; low/high bound the kept terms (None: unbounded).
    raw (CPU tensors): rows of any norm at their L2 distance, read as unit rows' √(2 − 2s̃)
    with s̃ = 1 − d²/2 (contrastive_cpu.cpp), as contrastive_rows_self's raw."""
    args = (x_unit.contiguous(), r_unit.contiguous(), labels.contiguous(),
            ref_labels.contiguous(), bool(exclude_diag), bool(cosine), float(pos_margin),
            float(neg_margin), _bound(low, -math.inf), _bound(high, math.inf), int(chunk))
    # (raw only when set: the CUDA engine calls this op through the same glue without it)
    return call(torch.ops.metrix_ops.contrastive_fwd, *args, *((True,) if raw else ()))


def contrastive_rows_self(x_unit, labels, cosine: bool, pos_margin: float, neg_margin: float,
                          low=None, high=None, block: int = 1024, raw: bool = False):
    """contrastive_rows of a batch against itself (self pairs excluded), using S's symmetry:
    half the similarity products, and one gradient product per block pair. raw: x_unit holds
    rows of any norm, and the op reads their L2 distance d as unit rows' √(2 − 2s̃) with
    s̃ = 1 − d²/2 (contrastive_self_cpu.cpp), so `cosine` with moved margins is its square
    (fused/contrastive.op_form)."""
    return call(torch.ops.metrix_ops.contrastive_self_fwd,
        x_unit.contiguous(), labels.contiguous(), bool(cosine), float(pos_margin),
        float(neg_margin), _bound(low, -math.inf), _bound(high, math.inf), int(block),
        bool(raw))
