"""Multi-similarity loss rows from the fused streaming op (csrc/*/ms_loss_*): the Python
side — fake kernel for torch.compile, autograd, and the call. Inputs are unit rows: the
normalisation and its gradient stay in PyTorch (O(B·D))."""
from __future__ import annotations

import torch

from .. import _ext
from .autograd import call, register_autograd

_FWD = "metrix_ops::ms_loss_fwd"

if _ext.HAS_EXT:
    @torch.library.register_fake(_FWD)
    def _fake(x, r, labels, ref_labels, exclude_diag, alpha, beta, base, chunk):
        b = x.shape[0]
        return x.new_empty(b), x.new_empty(b), x.new_empty(b)

    @torch.library.register_fake("metrix_ops::ms_loss_bwd")
    def _fake_bwd(grad_rows, x, r, labels, ref_labels, lse_pos, lse_neg, exclude_diag, alpha,
                  beta, base, chunk):
        return torch.empty_like(x), torch.empty_like(r)

    def _setup_context(ctx, inputs, output):
        x, r, labels, ref_labels, exclude_diag, alpha, beta, base, chunk = inputs
        ctx.save_for_backward(x, r, labels, ref_labels, output[1], output[2])
        ctx.args = (exclude_diag, alpha, beta, base, chunk)
        ctx.mark_non_differentiable(output[1], output[2])

    def _backward(ctx, g_rows, _g_lp, _g_ln):
        x, r, labels, ref_labels, lse_pos, lse_neg = ctx.saved_tensors
        dx, dr = torch.ops.metrix_ops.ms_loss_bwd(g_rows.contiguous(), x, r, labels, ref_labels,
                                                  lse_pos, lse_neg, *ctx.args)
        return dx, dr, None, None, None, None, None, None, None

    register_autograd(_FWD, _backward, setup_context=_setup_context)

    @torch.library.register_fake("metrix_ops::ms_loss_self_fwd")
    def _fake_self(x, labels, alpha, beta, base, block):
        b = x.shape[0]
        return x.new_empty(b), x.new_empty(b), x.new_empty(b)

    @torch.library.register_fake("metrix_ops::ms_loss_self_bwd")
    def _fake_self_bwd(grad_rows, x, labels, lse_pos, lse_neg, alpha, beta, base, block):
        return torch.empty_like(x)

    def _setup_self(ctx, inputs, output):
        x, labels, alpha, beta, base, block = inputs
        ctx.save_for_backward(x, labels, output[1], output[2])
        ctx.args = (alpha, beta, base, block)
        ctx.mark_non_differentiable(output[1], output[2])

    def _backward_self(ctx, g_rows, _g_lp, _g_ln):
        x, labels, lse_pos, lse_neg = ctx.saved_tensors
        dx = torch.ops.metrix_ops.ms_loss_self_bwd(g_rows.contiguous(), x, labels, lse_pos,
                                                   lse_neg, *ctx.args)
        return dx, None, None, None, None, None

    register_autograd("metrix_ops::ms_loss_self_fwd", _backward_self,
                                    setup_context=_setup_self)


if _ext.HAS_EXT:
    @torch.library.register_fake("metrix_ops::ms_mine_bounds")
    def _fake_bounds(x, r, labels, ref_labels, exclude_diag, chunk):
        b = x.shape[0]
        return x.new_empty(b), x.new_empty(b)

    @torch.library.register_fake("metrix_ops::ms_mined_fwd")
    def _fake_mined(x, r, labels, ref_labels, hardest_neg, hardest_pos, exclude_diag, alpha,
                    beta, base, eps, chunk):
        b = x.shape[0]
        return (x.new_empty(b), x.new_empty(b), x.new_empty(b),
                x.new_empty((b, 2), dtype=torch.long))

    @torch.library.register_fake("metrix_ops::ms_mined_bwd")
    def _fake_mined_bwd(grad_rows, x, r, labels, ref_labels, lse_pos, lse_neg, hardest_neg,
                        hardest_pos, exclude_diag, alpha, beta, base, eps, chunk):
        return torch.empty_like(x), torch.empty_like(r)

    def _setup_mined(ctx, inputs, output):
        x, r, labels, ref_labels, hn, hp, exclude_diag, alpha, beta, base, eps, chunk = inputs
        ctx.save_for_backward(x, r, labels, ref_labels, output[1], output[2], hn, hp)
        ctx.args = (exclude_diag, alpha, beta, base, eps, chunk)
        ctx.mark_non_differentiable(output[1], output[2], output[3])

    def _backward_mined(ctx, g_rows, _g_lp, _g_ln, _g_kept):
        x, r, labels, ref_labels, lse_pos, lse_neg, hn, hp = ctx.saved_tensors
        dx, dr = torch.ops.metrix_ops.ms_mined_bwd(g_rows.contiguous(), x, r, labels, ref_labels,
                                                   lse_pos, lse_neg, hn, hp, *ctx.args)
        return dx, dr, None, None, None, None, None, None, None, None, None, None

    register_autograd("metrix_ops::ms_mined_fwd", _backward_mined,
                                    setup_context=_setup_mined)

    # the miner and the loss of the batch against itself (csrc/cpu/ms_mined_self_cpu.cpp)
    @torch.library.register_fake("metrix_ops::ms_mine_bounds_self")
    def _fake_bounds_self(x, labels, block):
        b = x.shape[0]
        return x.new_empty(b), x.new_empty(b)

    @torch.library.register_fake("metrix_ops::ms_mined_self_fwd")
    def _fake_mined_self(x, labels, hardest_neg, hardest_pos, alpha, beta, base, eps, block):
        b = x.shape[0]
        return (x.new_empty(b), x.new_empty(b), x.new_empty(b),
                x.new_empty((b, 2), dtype=torch.long))

    @torch.library.register_fake("metrix_ops::ms_mined_self_bwd")
    def _fake_mined_self_bwd(grad_rows, x, labels, lse_pos, lse_neg, hardest_neg, hardest_pos,
                             alpha, beta, base, eps, block):
        return torch.empty_like(x)

    def _setup_mined_self(ctx, inputs, output):
        x, labels, hn, hp, *args = inputs
        ctx.save_for_backward(x, labels, output[1], output[2], hn, hp)
        ctx.args = tuple(args)
        ctx.mark_non_differentiable(output[1], output[2], output[3])

    def _backward_mined_self(ctx, g_rows, _g_lp, _g_ln, _g_kept):
        x, labels, lse_pos, lse_neg, hn, hp = ctx.saved_tensors
        dx = torch.ops.metrix_ops.ms_mined_self_bwd(g_rows.contiguous(), x, labels, lse_pos,
                                                    lse_neg, hn, hp, *ctx.args)
        return (dx,) + (None,) * 8

    register_autograd("metrix_ops::ms_mined_self_fwd", _backward_mined_self,
                                    setup_context=_setup_mined_self)


def ms_mined_rows(x_unit, r_unit, labels, ref_labels, exclude_diag: bool, alpha: float,
                  beta: float, base: float, epsilon: float, chunk: int = 2048):
    """ms_loss_rows over the pairs PML's MultiSimilarityMiner(epsilon) keeps, mined inside
    the op (two streaming passes: the anchors' hardest pairs, then the loss): per-anchor
    terms and the (positive, negative) pairs kept per anchor (B×2 int64)."""
    args = (x_unit.contiguous(), r_unit.contiguous(), labels.contiguous(), ref_labels.contiguous())
    with torch.no_grad():  # PML's miner is not differentiated
        hn, hp = torch.ops.metrix_ops.ms_mine_bounds(*args, bool(exclude_diag), int(chunk))
    rows, _, _, kept = call(torch.ops.metrix_ops.ms_mined_fwd,
        *args, hn, hp, bool(exclude_diag), float(alpha), float(beta), float(base), float(epsilon),
        int(chunk))
    return rows, kept


def ms_mined_rows_self(x_unit, labels, alpha: float, beta: float, base: float,
                       epsilon: float, block: int = 1024):
    """ms_mined_rows of the batch against itself (self pairs excluded), both passes over the
    symmetric blocks of S: half the products."""
    x, labels = x_unit.contiguous(), labels.contiguous()
    with torch.no_grad():  # PML's miner is not differentiated
        hn, hp = torch.ops.metrix_ops.ms_mine_bounds_self(x, labels, int(block))
    rows, _, _, kept = call(torch.ops.metrix_ops.ms_mined_self_fwd,
        x, labels, hn, hp, float(alpha), float(beta), float(base), float(epsilon), int(block))
    return rows, kept


def ms_loss_rows(x_unit, r_unit, labels, ref_labels, exclude_diag: bool, alpha: float,
                 beta: float, base: float, chunk: int = 2048) -> torch.Tensor:
    """Per-anchor MS loss terms (1/α)log(1+Σ_P e^{−α(s−base)}) + (1/β)log(1+Σ_N e^{β(s−base)})."""
    rows, _, _ = call(torch.ops.metrix_ops.ms_loss_fwd,
        x_unit.contiguous(), r_unit.contiguous(), labels.contiguous(), ref_labels.contiguous(),
        bool(exclude_diag), float(alpha), float(beta), float(base), int(chunk))
    return rows


def ms_loss_rows_self(x_unit, labels, alpha: float, beta: float, base: float,
                      block: int = 1024) -> torch.Tensor:
    """ms_loss_rows of a batch against itself (self pairs excluded), using S's symmetry:
    half the similarity products, and one gradient product per block pair."""
    rows, _, _ = call(torch.ops.metrix_ops.ms_loss_self_fwd,
        x_unit.contiguous(), labels.contiguous(), float(alpha), float(beta), float(base),
        int(block))
    return rows
