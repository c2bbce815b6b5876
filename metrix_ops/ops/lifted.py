"""Lifted-structure losses from the fused streaming ops (csrc/cpu/lifted_cpu.cpp): fake
kernels for torch.compile, autograd, and the calls. Inputs are unit rows: the
normalisation and its gradient stay in PyTorch (O(B·D)).

gen_lifted_fwd: per anchor, GeneralizedLiftedStructureLoss's [lse⁺ + lse⁻]₊.
lifted_fwd: per anchor a, the sum and count of LiftedStructureLoss's kept terms of its
positive pairs (a, p); the op wants label-sorted inputs, which `lifted_rows` arranges."""
from __future__ import annotations

import torch

from .. import _ext
from .autograd import call, register_autograd
from .contrastive import _bound

_GEN = "metrix_ops::gen_lifted_fwd"
_LIFTED = "metrix_ops::lifted_fwd"
_GEN_SELF = "metrix_ops::gen_lifted_self_fwd"
_LIFTED_SELF = "metrix_ops::lifted_self_fwd"

if _ext.HAS_EXT:
    @torch.library.register_fake(_GEN)
    def _fake_gen(x, r, labels, ref_labels, exclude_diag, cosine, pos_margin, neg_margin, chunk,
                  raw=False):
        b = x.shape[0]
        return x.new_empty(b), x.new_empty(b), x.new_empty(b)

    @torch.library.register_fake("metrix_ops::gen_lifted_bwd")
    def _fake_gen_bwd(grad_rows, x, r, labels, ref_labels, lse_pos, lse_neg, exclude_diag,
                      cosine, pos_margin, neg_margin, chunk, raw=False):
        return torch.empty_like(x), torch.empty_like(r)

    def _setup_gen(ctx, inputs, output):
        x, r, labels, ref_labels, *args = inputs
        ctx.save_for_backward(x, r, labels, ref_labels, output[1], output[2])
        ctx.args = tuple(args)
        ctx.mark_non_differentiable(output[1], output[2])

    def _backward_gen(ctx, g_rows, _g_lp, _g_ln):
        x, r, labels, ref_labels, lse_pos, lse_neg = ctx.saved_tensors
        dx, dr = torch.ops.metrix_ops.gen_lifted_bwd(g_rows.contiguous(), x, r, labels,
                                                     ref_labels, lse_pos, lse_neg, *ctx.args)
        return (dx, dr) + (None,) * (2 + len(ctx.args))

    register_autograd(_GEN, _backward_gen, setup_context=_setup_gen)

    @torch.library.register_fake(_LIFTED)
    def _fake_lifted(x, r, labels, ref_labels, partner, exclude_diag, cosine, pos_margin,
                     neg_margin, low, high, chunk, raw=False):
        b = x.shape[0]
        return x.new_empty(b), x.new_empty(b, dtype=torch.long), x.new_empty(b)

    @torch.library.register_fake("metrix_ops::lifted_bwd")
    def _fake_lifted_bwd(grad_sums, x, r, labels, ref_labels, partner, lse_neg, exclude_diag,
                         cosine, pos_margin, neg_margin, low, high, chunk, raw=False):
        return torch.empty_like(x), torch.empty_like(r)

    def _setup_lifted(ctx, inputs, output):
        x, r, labels, ref_labels, partner, *args = inputs
        ctx.save_for_backward(x, r, labels, ref_labels, partner, output[2])
        ctx.args = tuple(args)
        ctx.mark_non_differentiable(output[1], output[2])

    def _backward_lifted(ctx, g_sums, _g_cnt, _g_ln):
        x, r, labels, ref_labels, partner, lse_neg = ctx.saved_tensors
        g_sums = torch.zeros_like(lse_neg) if g_sums is None else g_sums.contiguous()
        dx, dr = torch.ops.metrix_ops.lifted_bwd(g_sums, x, r, labels, ref_labels, partner,
                                                 lse_neg, *ctx.args)
        return (dx, dr) + (None,) * (3 + len(ctx.args))

    register_autograd(_LIFTED, _backward_lifted, setup_context=_setup_lifted)

    # the batch against itself: one input, one gradient
    @torch.library.register_fake(_GEN_SELF)
    def _fake_gen_self(x, labels, cosine, pos_margin, neg_margin, block, raw=False):
        b = x.shape[0]
        return x.new_empty(b), x.new_empty(b), x.new_empty(b)

    @torch.library.register_fake("metrix_ops::gen_lifted_self_bwd")
    def _fake_gen_self_bwd(grad_rows, x, labels, lse_pos, lse_neg, cosine, pos_margin,
                           neg_margin, block, raw=False):
        return torch.empty_like(x)

    def _setup_gen_self(ctx, inputs, output):
        x, labels, *args = inputs
        ctx.save_for_backward(x, labels, output[1], output[2])
        ctx.args = tuple(args)
        ctx.mark_non_differentiable(output[1], output[2])

    def _backward_gen_self(ctx, g_rows, _g_lp, _g_ln):
        x, labels, lse_pos, lse_neg = ctx.saved_tensors
        dx = torch.ops.metrix_ops.gen_lifted_self_bwd(g_rows.contiguous(), x, labels, lse_pos,
                                                      lse_neg, *ctx.args)
        return (dx,) + (None,) * (1 + len(ctx.args))

    register_autograd(_GEN_SELF, _backward_gen_self, setup_context=_setup_gen_self)

    @torch.library.register_fake(_LIFTED_SELF)
    def _fake_lifted_self(x, labels, cosine, pos_margin, neg_margin, low, high, block,
                          raw=False):
        b = x.shape[0]
        return x.new_empty(b), x.new_empty(b, dtype=torch.long), x.new_empty(b)

    @torch.library.register_fake("metrix_ops::lifted_self_bwd")
    def _fake_lifted_self_bwd(grad_sums, x, labels, lse_neg, cosine, pos_margin, neg_margin,
                              low, high, block, raw=False):
        return torch.empty_like(x)

    def _setup_lifted_self(ctx, inputs, output):
        x, labels, *args = inputs
        ctx.save_for_backward(x, labels, output[2])
        ctx.args = tuple(args)
        ctx.mark_non_differentiable(output[1], output[2])

    def _backward_lifted_self(ctx, g_sums, _g_cnt, _g_ln):
        x, labels, lse_neg = ctx.saved_tensors
        g_sums = torch.zeros_like(lse_neg) if g_sums is None else g_sums.contiguous()
        dx = torch.ops.metrix_ops.lifted_self_bwd(g_sums, x, labels, lse_neg, *ctx.args)
        return (dx,) + (None,) * (1 + len(ctx.args))

    register_autograd(_LIFTED_SELF, _backward_lifted_self,
                                    setup_context=_setup_lifted_self)


def gen_lifted_rows(x_unit, r_unit, labels, ref_labels, exclude_diag: bool, cosine: bool,
                    pos_margin: float, neg_margin: float, chunk: int = 2048,
                    raw: bool = False) -> torch.Tensor:
    """Per-anchor GeneralizedLiftedStructureLoss terms [lse⁺ + lse⁻]₊ of unit anchors
    against unit references (cosine: CosineSimilarity margins, else normalised L2). raw (CPU
    tensors): rows of any norm at their L2 distance (self_walk.h's sq)."""
    args = (x_unit.contiguous(), r_unit.contiguous(), labels.contiguous(),
            ref_labels.contiguous(), bool(exclude_diag), bool(cosine), float(pos_margin),
            float(neg_margin), int(chunk))
    # (raw only when set: the CUDA engine calls this op through the same glue without it)
    rows, _, _ = call(torch.ops.metrix_ops.gen_lifted_fwd, *args, *((True,) if raw else ()))
    return rows


def gen_lifted_rows_self(x_unit, labels, cosine: bool, pos_margin: float, neg_margin: float,
                         block: int = 1024, raw: bool = False) -> torch.Tensor:
    """gen_lifted_rows of a batch against itself (self pairs excluded), using S's symmetry:
    half the similarity products, and one gradient product per block pair. raw: x_unit
    holds rows of any norm, and the op takes their L2 distance (self_walk.h)."""
    rows, _, _ = call(torch.ops.metrix_ops.gen_lifted_self_fwd,
        x_unit.contiguous(), labels.contiguous(), bool(cosine), float(pos_margin),
        float(neg_margin), int(block), bool(raw))
    return rows


def _inverse(order):
    inv = torch.empty_like(order)
    inv[order] = torch.arange(len(order), device=order.device)
    return inv


def lifted_rows(x_unit, r_unit, labels, ref_labels, same_set: bool, cosine: bool,
                pos_margin: float, neg_margin: float, low=None, high=None,
                chunk: int = 2048, raw: bool = False):
    """(sums, counts): per anchor, in label-sorted order (the caller only sums them), the
    sum and count of its positive pairs' LiftedStructureLoss terms with low < term < high.

    same_set: the references' labels are the batch's (same tensor), so reference j is the
    batch's j-th example and the self pairs are not positives. PML's quirk: the pair (a, p)
    also uses the negatives of *batch row* p, whenever p < B. raw (CPU): x_unit and r_unit
    hold rows of any norm, and the op takes their L2 distance."""
    ox = torch.argsort(labels, stable=True)
    low, high = _bound(low, -float("inf")), _bound(high, float("inf"))
    orf = ox if same_set else torch.argsort(ref_labels, stable=True)
    b = labels.shape[0]
    # partner of sorted reference k: the sorted position of batch row orf[k], or -1
    src = orf.clamp(max=max(b - 1, 0))
    partner = torch.where(orf < b, _inverse(ox)[src] if b else orf, torch.full_like(orf, -1))
    sums, counts, _ = call(torch.ops.metrix_ops.lifted_fwd,
        x_unit.index_select(0, ox).contiguous(), r_unit.index_select(0, orf).contiguous(),
        labels.index_select(0, ox).contiguous(), ref_labels.index_select(0, orf).contiguous(),
        partner.contiguous(), bool(same_set), bool(cosine), float(pos_margin),
        float(neg_margin), low, high, int(chunk), *((True,) if raw else ()))
    return sums, counts


def lifted_rows_self(x_unit, labels, cosine: bool, pos_margin: float, neg_margin: float,
                     low=None, high=None, block: int = 1024, raw: bool = False):
    """lifted_rows of a batch against itself (self pairs excluded, partner p = p), its
    negative pass using S's symmetry: half the similarity products, one gradient product per
    block pair. raw: x_unit holds rows of any norm, and the op takes their L2 distance."""
    ox = torch.argsort(labels, stable=True)
    sums, counts, _ = call(torch.ops.metrix_ops.lifted_self_fwd,
        x_unit.index_select(0, ox).contiguous(), labels.index_select(0, ox).contiguous(),
        bool(cosine), float(pos_margin), float(neg_margin), _bound(low, -float("inf")),
        _bound(high, float("inf")), int(block), bool(raw))
    return sums, counts
