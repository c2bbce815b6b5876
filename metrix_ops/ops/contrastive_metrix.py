"""Contrastive loss with its embedding-level Metrix term (pairs "pos_neg" or "anchor_neg")
from one fused op (csrc/cpu/contrastive_metrix_self_cpu.cpp): fake kernel for
torch.compile, autograd, and the call. The op wants a label-sorted batch;
`contrastive_metrix_rows` sorts and unsorts, so the caller sees rows in its own order.
Inputs are unit rows (normalisation stays in PyTorch).

Per anchor the op returns the clean (pos_sum, pos_count, neg_sum, neg_count) of
contrastive_self_fwd and the same four over its mixed candidates' terms λ·[·]₊ and
(1−λ)·[·]₊ (counted when > 0). Sums are differentiable, counts (int64) are not."""
from __future__ import annotations

import math

import torch

from .. import _ext
from .autograd import call, register_autograd
from .ms_metrix import group_entries, label_sorted, refs_sorted

_FWD = "metrix_ops::contrastive_metrix_self_fwd"

if _ext.HAS_EXT:
    @torch.library.register_fake(_FWD)
    def _fake(x, labels, cosine, pos_margin, neg_margin, low, high, lam, anchor_neg, block):
        b = x.shape[0]
        return tuple(x.new_empty(b) if k % 2 == 0 else x.new_empty(b, dtype=torch.long)
                     for k in range(8))

    @torch.library.register_fake("metrix_ops::contrastive_metrix_self_bwd")
    def _fake_bwd(grad_pos, grad_neg, grad_mix_pos, grad_mix_neg, x, labels, cosine,
                  pos_margin, neg_margin, low, high, lam, anchor_neg, block):
        return torch.empty_like(x)

    def _setup_context(ctx, inputs, output):
        x, labels, *args = inputs
        ctx.save_for_backward(x, labels, output[0])
        ctx.args = tuple(args)
        ctx.mark_non_differentiable(output[1], output[3], output[5], output[7])

    def _backward(ctx, g_pos, _gpc, g_neg, _gnc, g_mpos, _gmpc, g_mneg, _gmnc):
        x, labels, like = ctx.saved_tensors
        # an output nobody used may come back as None; the op wants all four row gradients
        gs = [torch.zeros_like(like) if g is None else g.contiguous()
              for g in (g_pos, g_neg, g_mpos, g_mneg)]
        dx = torch.ops.metrix_ops.contrastive_metrix_self_bwd(*gs, x, labels, *ctx.args)
        return (dx,) + (None,) * 9

    register_autograd(_FWD, _backward, setup_context=_setup_context)

    _REFS = "metrix_ops::contrastive_metrix_refs_fwd"

    @torch.library.register_fake(_REFS)
    def _fake_refs(x, r, labels, ref_labels, self_rows, cosine, pos_margin, neg_margin, lam,
                   anchor_neg, clean, low, high, group):
        b = x.shape[0]  # sums in x's dtype, counts int64 (con_outputs)
        return tuple(x.new_empty(b) if k % 2 == 0 else x.new_empty(b, dtype=torch.long)
                     for k in range(8))

    @torch.library.register_fake("metrix_ops::contrastive_metrix_refs_bwd")
    def _fake_refs_bwd(grad_pos, grad_neg, grad_mix_pos, grad_mix_neg, x, r, *rest):
        return torch.empty_like(x), torch.empty_like(r)

    def _setup_refs(ctx, inputs, output):
        x, r, labels, ref_labels, self_rows, *args = inputs
        ctx.save_for_backward(x, r, labels, ref_labels, self_rows, output[0])
        ctx.args = tuple(args)
        ctx.mark_non_differentiable(output[1], output[3], output[5], output[7])

    def _backward_refs(ctx, g_pos, _gpc, g_neg, _gnc, g_mpos, _gmpc, g_mneg, _gmnc):
        x, r, labels, ref_labels, self_rows, like = ctx.saved_tensors
        gs = [torch.zeros_like(like) if g is None else g.contiguous()
              for g in (g_pos, g_neg, g_mpos, g_mneg)]
        dx, dr = torch.ops.metrix_ops.contrastive_metrix_refs_bwd(
            *gs, x, r, labels, ref_labels, self_rows, *ctx.args, ctx.needs_input_grad[1])
        return (dx, dr if ctx.needs_input_grad[1] else None) + (None,) * 12

    register_autograd(_REFS, _backward_refs, setup_context=_setup_refs)


def contrastive_metrix_rows(x_unit, labels, cosine: bool, pos_margin: float, neg_margin: float,
                            lam: float, pairs: str = "pos_neg", low=None, high=None,
                            block: int = 1024):
    """(clean, mixed), each (pos_sum, pos_count, neg_sum, neg_count) of (B,) tensors in the
    caller's order: the clean terms of each anchor against the batch (self pairs excluded;
    kept when low < term < high, None: unbounded), and its Metrix candidates' terms over
    mix(p, n, λ), n ∈ N(a), p ∈ P(a) for pairs "pos_neg" (a itself when P(a) is empty),
    p = a for "anchor_neg" (kept when > 0)."""
    if pairs not in ("pos_neg", "anchor_neg"):
        raise ValueError(f"pairs must be 'pos_neg' or 'anchor_neg', got {pairs!r}")
    xs, ys, inverse = label_sorted(x_unit, labels)
    out = call(torch.ops.metrix_ops.contrastive_metrix_self_fwd,
        xs, ys, bool(cosine), float(pos_margin), float(neg_margin),
        -math.inf if low is None else float(low), math.inf if high is None else float(high),
        float(lam), pairs == "anchor_neg", int(block))
    out = [t.index_select(0, inverse) for t in out]
    return tuple(out[:4]), tuple(out[4:])


def contrastive_metrix_refs_rows(x_unit, r_unit, labels, ref_labels, self_idx, cosine: bool,
                                 pos_margin: float, neg_margin: float, lam: float,
                                 pairs: str = "pos_neg", clean: bool = False, low=None,
                                 high=None):
    """(clean, mixed) as contrastive_metrix_rows returns them, for the anchors against
    references: the clean terms of each anchor against the references (its own row
    self_idx[a], −1: none, is no pair; kept when low < term < high), zeros unless clean; the
    mixed terms of the candidates mix(p, n, λ) of a reference positive p (not a's own row)
    and a reference negative n, or mix(a, n) (no such p, or "anchor_neg")."""
    if pairs not in ("pos_neg", "anchor_neg"):
        raise ValueError(f"pairs must be 'pos_neg' or 'anchor_neg', got {pairs!r}")
    *args, inverse = refs_sorted(x_unit, r_unit, labels, ref_labels, self_idx)
    out = call(torch.ops.metrix_ops.contrastive_metrix_refs_fwd,
        *args, bool(cosine), float(pos_margin), float(neg_margin), float(lam),
        pairs == "anchor_neg", bool(clean), -math.inf if low is None else float(low),
        math.inf if high is None else float(high), group_entries())
    out = [t.index_select(0, inverse) for t in out]
    return tuple(out[:4]), tuple(out[4:])
