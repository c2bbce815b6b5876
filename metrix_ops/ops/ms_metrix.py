"""Multi-similarity loss with its embedding-level Metrix term (pairs "pos_neg") from one
fused op (csrc/cpu/ms_metrix_self_cpu.cpp): fake kernel for torch.compile, autograd, and
the call. The op wants a label-sorted batch; `ms_metrix_rows` sorts and unsorts, so the
caller sees rows in its own order. Inputs are unit rows (normalisation stays in PyTorch)."""
from __future__ import annotations

import torch

from .. import _ext
from .autograd import call, register_autograd

_FWD = "metrix_ops::ms_metrix_self_fwd"
# the refs op's classes go in groups whose tiles (anchors' and positives' rows × M) hold
# about this many entries: three such tiles (S, 1/‖v‖, ∂L/∂S) per group, 48 MiB in fp32
# (96 in fp64)
GROUP_ENTRIES = 1 << 22

if _ext.HAS_EXT:
    @torch.library.register_fake(_FWD)
    def _fake(x, labels, alpha, beta, base, lam, anchor_neg, block):
        return tuple(x.new_empty(x.shape[0]) for _ in range(6))

    @torch.library.register_fake("metrix_ops::ms_metrix_self_bwd")
    def _fake_bwd(grad_rows, grad_mix, x, labels, lse_pos, lse_neg, tp, tn, alpha, beta, base,
                  lam, anchor_neg, block):
        return torch.empty_like(x)

    def _setup_context(ctx, inputs, output):
        x, labels, alpha, beta, base, lam, anchor_neg, block = inputs
        _, lse_pos, lse_neg, _, tp, tn = output
        ctx.save_for_backward(x, labels, lse_pos, lse_neg, tp, tn)
        ctx.args = (alpha, beta, base, lam, anchor_neg, block)
        ctx.mark_non_differentiable(lse_pos, lse_neg, tp, tn)

    def _backward(ctx, g_rows, _glp, _gln, g_mix, _gtp, _gtn):
        x, labels, lse_pos, lse_neg, tp, tn = ctx.saved_tensors
        g_rows = torch.zeros_like(lse_pos) if g_rows is None else g_rows.contiguous()
        g_mix = torch.zeros_like(lse_pos) if g_mix is None else g_mix.contiguous()
        dx = torch.ops.metrix_ops.ms_metrix_self_bwd(g_rows, g_mix, x, labels, lse_pos, lse_neg,
                                                     tp, tn, *ctx.args)
        return dx, None, None, None, None, None, None, None

    register_autograd(_FWD, _backward, setup_context=_setup_context)

    _REFS = "metrix_ops::ms_metrix_refs_fwd"

    @torch.library.register_fake(_REFS)
    def _fake_refs(x, r, labels, ref_labels, self_rows, alpha, beta, base, lam, anchor_neg,
                   clean, group):
        return tuple(x.new_empty(x.shape[0]) for _ in range(6))

    @torch.library.register_fake("metrix_ops::ms_metrix_refs_bwd")
    def _fake_refs_bwd(grad_rows, grad_mix, x, r, labels, ref_labels, self_rows, lse_pos,
                       lse_neg, tp, tn, alpha, beta, base, lam, anchor_neg, clean, group,
                       need_dr):
        return torch.empty_like(x), torch.empty_like(r)

    def _setup_refs(ctx, inputs, output):
        x, r, labels, ref_labels, self_rows, *consts = inputs
        _, lse_pos, lse_neg, _, tp, tn = output
        ctx.save_for_backward(x, r, labels, ref_labels, self_rows, lse_pos, lse_neg, tp, tn)
        ctx.consts = tuple(consts)
        ctx.mark_non_differentiable(lse_pos, lse_neg, tp, tn)

    def _backward_refs(ctx, g_rows, _glp, _gln, g_mix, _gtp, _gtn):
        x, r, labels, ref_labels, self_rows, *stats = ctx.saved_tensors
        zero = torch.zeros_like(stats[0])
        dx, dr = torch.ops.metrix_ops.ms_metrix_refs_bwd(
            zero if g_rows is None else g_rows.contiguous(),
            zero if g_mix is None else g_mix.contiguous(), x, r, labels, ref_labels, self_rows,
            *stats, *ctx.consts, ctx.needs_input_grad[1])
        return (dx, dr if ctx.needs_input_grad[1] else None) + (None,) * 10

    register_autograd(_REFS, _backward_refs, setup_context=_setup_refs)


def label_sorted(x, labels):
    """(x, labels) sorted by label (stably) for the Metrix ops, which cut their blocks between
    classes, and the permutation that takes their per-row outputs back to the caller's order."""
    order = torch.argsort(labels, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=order.device)
    return (x.index_select(0, order).contiguous(), labels.index_select(0, order).contiguous(),
            inverse)


def ms_metrix_rows(x_unit, labels, alpha: float, beta: float, base: float, lam: float,
                   pairs: str = "pos_neg", block: int = 1024):
    """(clean rows, mixed rows), each (B,), in the caller's order: the MS terms of each anchor
    against the batch (self pairs excluded) and its Metrix term ℓ̃(a) over the candidates
    mix(p, n, λ), n ∈ N(a), p ∈ P(a) for pairs "pos_neg" (a itself when P(a) is empty), p = a
    for "anchor_neg"; 0 where V(a) is empty."""
    if pairs not in ("pos_neg", "anchor_neg"):
        raise ValueError(f"pairs must be 'pos_neg' or 'anchor_neg', got {pairs!r}")
    xs, ys, inverse = label_sorted(x_unit, labels)
    rows, _, _, mix, _, _ = call(torch.ops.metrix_ops.ms_metrix_self_fwd,
        xs, ys, float(alpha), float(beta), float(base), float(lam), pairs == "anchor_neg",
        int(block))
    return rows.index_select(0, inverse), mix.index_select(0, inverse)


def ms_metrix_refs_rows(x_unit, r_unit, labels, ref_labels, self_idx, alpha: float,
                        beta: float, base: float, lam: float, pairs: str = "pos_neg",
                        clean: bool = True, group: int | None = None):
    """(clean rows, mixed rows), each (B,), in the caller's order, of the anchors against the
    references: the MS terms of each anchor (its own row self_idx[a] of the references, −1:
    none, is not a pair), zeros unless clean; and ℓ̃(a) over the candidates mix(p, n, λ) of a
    reference positive p (not a's own row) and a reference negative n, or, with no such p
    or under pairs "anchor_neg", mix(a, n); 0 where a has no negative among the references."""
    if pairs not in ("pos_neg", "anchor_neg"):
        raise ValueError(f"pairs must be 'pos_neg' or 'anchor_neg', got {pairs!r}")
    *args, inverse = refs_sorted(x_unit, r_unit, labels, ref_labels, self_idx)
    rows, _, _, mix, _, _ = call(torch.ops.metrix_ops.ms_metrix_refs_fwd,
        *args, float(alpha), float(beta), float(base), float(lam), pairs == "anchor_neg",
        bool(clean), group_entries(group))
    return rows.index_select(0, inverse), mix.index_select(0, inverse)


def refs_sorted(x_unit, r_unit, labels, ref_labels, self_idx):
    """The refs ops' inputs (xs, rs, ys, rys, own) — anchors and references each sorted by
    label, each anchor's own row self_idx (−1: none) renumbered into the sorted references —
    and the permutation that takes per-anchor outputs back to the caller's order."""
    xs, ys, inverse = label_sorted(x_unit, labels)
    order = torch.argsort(ref_labels, stable=True)
    rs, rys = r_unit.index_select(0, order).contiguous(), ref_labels.index_select(0, order)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=order.device)
    own = self_idx.index_select(0, torch.argsort(labels, stable=True))
    own = torch.where(own >= 0, rank.index_select(0, own.clamp(min=0)) if len(rank) else own,
                      own)
    return xs, rs, ys, rys.contiguous(), own.contiguous(), inverse


def group_entries(group=None) -> int:
    return int(GROUP_ENTRIES if group is None else group)
