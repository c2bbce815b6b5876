"""NT-Xent and SupCon rows from the fused streaming ops (csrc/cpu/ntxent_cpu.cpp): fake
kernels for torch.compile, autograd, and the calls. Inputs are unit rows: normalisation and
its gradient stay in PyTorch. Passing the same tensor as x and r (the batch against itself)
is fine: autograd adds the two gradients."""
from __future__ import annotations

import torch

from .. import _ext
from .autograd import call, register_autograd
from .contrastive import _bound
from .proxy_anchor import default_chunk

_NTX = "metrix_ops::ntxent_fwd"
_SUP = "metrix_ops::supcon_fwd"
_SUP_SELF = "metrix_ops::supcon_self_fwd"
_NTX_SELF = "metrix_ops::ntxent_self_fwd"


def _row_grad(g, like):
    # the op wants a row gradient even when the loss did not use that output
    return (torch.zeros_like(like) if g is None else g).contiguous()


def _input_grads(ctx, dx, dr, n_args):
    return (dx, dr if ctx.needs_input_grad[1] else None) + (None,) * n_args


if _ext.HAS_EXT:
    @torch.library.register_fake(_NTX)
    def _fake(x, r, labels, ref_labels, exclude_diag, temperature, low, high, chunk):
        b = x.shape[0]
        return x.new_empty(b), x.new_empty(b, dtype=torch.long), x.new_empty(b), x.new_empty(b)

    @torch.library.register_fake("metrix_ops::ntxent_bwd")
    def _fake_bwd(grad_sums, x, r, labels, ref_labels, neg_max, neg_sum, exclude_diag,
                  temperature, low, high, chunk, need_dr):
        return torch.empty_like(x), torch.empty_like(r)

    def _setup(ctx, inputs, output):
        x, r, labels, ref_labels, *args = inputs
        ctx.save_for_backward(x, r, labels, ref_labels, output[0], output[2], output[3])
        ctx.args = tuple(args)
        ctx.mark_non_differentiable(*output[1:])

    def _backward(ctx, g_sums, *_):
        x, r, labels, ref_labels, like, neg_max, neg_sum = ctx.saved_tensors
        dx, dr = torch.ops.metrix_ops.ntxent_bwd(_row_grad(g_sums, like), x, r, labels,
                                                 ref_labels, neg_max, neg_sum, *ctx.args,
                                                 bool(ctx.needs_input_grad[1]))
        return _input_grads(ctx, dx, dr, 7)

    register_autograd(_NTX, _backward, setup_context=_setup)

    @torch.library.register_fake(_SUP)
    def _fake_sup(x, r, labels, ref_labels, exclude_diag, temperature, chunk):
        b = x.shape[0]
        return x.new_empty(b), x.new_empty(b)

    @torch.library.register_fake("metrix_ops::supcon_bwd")
    def _fake_sup_bwd(grad_rows, x, r, labels, ref_labels, lse, exclude_diag, temperature,
                      chunk, need_dr):
        return torch.empty_like(x), torch.empty_like(r)

    def _setup_sup(ctx, inputs, output):
        x, r, labels, ref_labels, *args = inputs
        ctx.save_for_backward(x, r, labels, ref_labels, output[1])
        ctx.args = tuple(args)
        ctx.mark_non_differentiable(output[1])

    def _backward_sup(ctx, g_rows, _g_lse):
        x, r, labels, ref_labels, lse = ctx.saved_tensors
        dx, dr = torch.ops.metrix_ops.supcon_bwd(_row_grad(g_rows, lse), x, r, labels,
                                                 ref_labels, lse, *ctx.args,
                                                 bool(ctx.needs_input_grad[1]))
        return _input_grads(ctx, dx, dr, 5)

    register_autograd(_SUP, _backward_sup, setup_context=_setup_sup)

    # NT-Xent of the batch against itself: one input, one gradient
    @torch.library.register_fake(_NTX_SELF)
    def _fake_self(x, labels, temperature, low, high, block):
        b = x.shape[0]
        v = x.new_empty(b)
        return v, x.new_empty(b, dtype=torch.long), x.new_empty(b), x.new_empty(b), v.clone()

    @torch.library.register_fake("metrix_ops::ntxent_self_bwd")
    def _fake_self_bwd(grad_sums, x, labels, neg_max, neg_sum, w_total, temperature, low,
                       high, block):
        return torch.empty_like(x)

    def _setup_self(ctx, inputs, output):
        x, labels, *args = inputs
        ctx.save_for_backward(x, labels, output[0], *output[2:])
        ctx.args = tuple(args)
        ctx.mark_non_differentiable(*output[1:])

    def _backward_self(ctx, g_sums, *_):
        x, labels, like, neg_max, neg_sum, w_total = ctx.saved_tensors
        dx = torch.ops.metrix_ops.ntxent_self_bwd(_row_grad(g_sums, like), x, labels, neg_max,
                                                  neg_sum, w_total, *ctx.args)
        return (dx,) + (None,) * 5

    register_autograd(_NTX_SELF, _backward_self, setup_context=_setup_self)

    # SupCon of the batch against itself: one input, one gradient
    @torch.library.register_fake(_SUP_SELF)
    def _fake_sup_self(x, labels, temperature, block):
        b = x.shape[0]
        return x.new_empty(b), x.new_empty(b)

    @torch.library.register_fake("metrix_ops::supcon_self_bwd")
    def _fake_sup_self_bwd(grad_rows, x, labels, lse, temperature, block):
        return torch.empty_like(x)

    def _setup_sup_self(ctx, inputs, output):
        x, labels, *args = inputs
        ctx.save_for_backward(x, labels, output[1])
        ctx.args = tuple(args)
        ctx.mark_non_differentiable(output[1])

    def _backward_sup_self(ctx, g_rows, _g_lse):
        x, labels, lse = ctx.saved_tensors
        dx = torch.ops.metrix_ops.supcon_self_bwd(_row_grad(g_rows, lse), x, labels, lse,
                                                  *ctx.args)
        return (dx,) + (None,) * 3

    register_autograd(_SUP_SELF, _backward_sup_self,
                                    setup_context=_setup_sup_self)


def ntxent_rows(x_unit, r_unit, labels, ref_labels, exclude_diag: bool, temperature: float,
                low=None, high=None, chunk=None):
    """Per anchor (sum, count) of its NT-Xent positive-pair losses inside low < loss < high
    (None: unbounded); the sums are differentiable, the int64 counts are not."""
    chunk = default_chunk(r_unit.shape[0]) if chunk is None else chunk
    sums, counts, _, _ = call(torch.ops.metrix_ops.ntxent_fwd,
        x_unit.contiguous(), r_unit.contiguous(), labels.contiguous(), ref_labels.contiguous(),
        bool(exclude_diag), float(temperature), _bound(low, -float("inf")),
        _bound(high, float("inf")), int(chunk))
    return sums, counts


def ntxent_rows_self(x_unit, labels, temperature: float, low=None, high=None,
                     block: int = 1024):
    """ntxent_rows of the batch against itself (self pairs excluded), from the symmetric
    blocks of S (csrc/cpu/ntxent_self_cpu.cpp): half the products."""
    sums, counts, _, _, _ = call(torch.ops.metrix_ops.ntxent_self_fwd,
        x_unit.contiguous(), labels.contiguous(), float(temperature),
        _bound(low, -float("inf")), _bound(high, float("inf")), int(block))
    return sums, counts


def supcon_rows(x_unit, r_unit, labels, ref_labels, exclude_diag: bool, temperature: float,
                chunk=None):
    """Per-anchor SupCon losses (0 for an anchor without positives)."""
    chunk = default_chunk(r_unit.shape[0]) if chunk is None else chunk
    rows, _ = call(torch.ops.metrix_ops.supcon_fwd,
        x_unit.contiguous(), r_unit.contiguous(), labels.contiguous(), ref_labels.contiguous(),
        bool(exclude_diag), float(temperature), int(chunk))
    return rows


def supcon_rows_self(x_unit, labels, temperature: float, block: int = 1024):
    """supcon_rows of the batch against itself (self pairs excluded), from the symmetric
    blocks of S (csrc/cpu/supcon_self_cpu.cpp): half the products."""
    rows, _ = call(torch.ops.metrix_ops.supcon_self_fwd, x_unit.contiguous(), labels.contiguous(),
                                                   float(temperature), int(block))
    return rows
