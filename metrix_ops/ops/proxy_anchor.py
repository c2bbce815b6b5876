"""Proxy-anchor per-proxy terms from the fused streaming op (csrc/cpu/proxy_anchor_cpu.cpp):
fake kernel for torch.compile, autograd, and the call. Inputs are unit rows: normalisation
and its gradient stay in PyTorch (O((B+C)·D))."""
from __future__ import annotations

import torch

from .. import _ext
from .autograd import call, register_autograd

_FWD = "metrix_ops::proxy_anchor_fwd"
_WFWD = "metrix_ops::proxy_anchor_weighted_fwd"


def _register(fwd: str, n_tensors: int):
    """Fake kernels and autograd of a proxy-anchor op pair: fwd(x, p, labels[, log_w], alpha,
    margin, chunk) -> (pos, neg) and its _bwd(grad_pos, grad_neg, <the same tensors>, pos, neg,
    alpha, margin, chunk) -> (dx, dp). The inputs after x and p (labels, log_w: the weighted
    form's per-example log-weights, counts of an index tuple) take no gradient."""
    bwd = fwd.replace("_fwd", "_bwd")

    @torch.library.register_fake(fwd)
    def _fake(x, p, *rest):
        return x.new_empty(p.shape[0]), x.new_empty(p.shape[0])

    @torch.library.register_fake(bwd)
    def _fake_bwd(grad_pos, grad_neg, x, p, *rest):
        return torch.empty_like(x), torch.empty_like(p)

    def _setup_context(ctx, inputs, output):
        # the terms are the log-sum-exps the backward needs
        ctx.save_for_backward(*inputs[:n_tensors], output[0], output[1])
        ctx.args = inputs[n_tensors:]

    def _backward(ctx, g_pos, g_neg):
        *tensors, pos, neg = ctx.saved_tensors
        g_pos = torch.zeros_like(pos) if g_pos is None else g_pos.contiguous()
        g_neg = torch.zeros_like(neg) if g_neg is None else g_neg.contiguous()
        op = getattr(torch.ops.metrix_ops, bwd.split("::")[1])
        dx, dp = op(g_pos, g_neg, *tensors, pos, neg, *ctx.args)
        return (dx, dp) + (None,) * (n_tensors - 2 + len(ctx.args))

    register_autograd(fwd, _backward, setup_context=_setup_context)


_GFWD = "metrix_ops::proxy_anchor_grad_fwd"


def _register_grad_fwd():
    """Fake kernels and autograd of proxy_anchor_grad_fwd(x, p, labels, alpha, margin, chunk)
    -> (pos, neg, w, dx_neg, dp_neg), whose backward takes the gradient from the parts its
    forward computed (csrc/cpu/proxy_anchor_cpu.cpp: pa_grad_fwd); w, dx_neg, dp_neg are
    not differentiable outputs."""

    @torch.library.register_fake(_GFWD)
    def _fake(x, p, *rest):
        return (x.new_empty(p.shape[0]), x.new_empty(p.shape[0]), x.new_empty(x.shape[0]),
                torch.empty_like(x), torch.empty_like(p))

    @torch.library.register_fake(_GFWD.replace("_fwd", "_bwd"))
    def _fake_bwd(grad_pos, grad_neg, x, p, *rest):
        return torch.empty_like(x), torch.empty_like(p)

    def _setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:3], *output)
        ctx.mark_non_differentiable(*output[2:])
        ctx.args = inputs[3:]

    def _backward(ctx, g_pos, g_neg, *_):
        x, p, labels, pos, neg, w, dx_neg, dp_neg = ctx.saved_tensors
        g_pos = torch.zeros_like(pos) if g_pos is None else g_pos.contiguous()
        g_neg = torch.zeros_like(neg) if g_neg is None else g_neg.contiguous()
        dx, dp = torch.ops.metrix_ops.proxy_anchor_grad_bwd(
            g_pos, g_neg, x, p, labels, pos, neg, w, dx_neg, dp_neg, *ctx.args)
        return dx, dp, None, None, None, None

    register_autograd(_GFWD, _backward, setup_context=_setup_context)


if _ext.HAS_EXT:
    _register(_FWD, 3)  # x, p, labels
    _register(_WFWD, 4)  # x, p, labels, log_w
    _register_grad_fwd()


def gradient_wanted_on_cpu(x, p) -> bool:
    """Whether the proxy ops' forward should also form the gradient (their *_grad_fwd, CPU
    only): three products, not four, the backward then needing no second pass over the
    tiles; without a gradient to come that would be two products wasted."""
    return (x.device.type == "cpu" and torch.is_grad_enabled()
            and (x.requires_grad or p.requires_grad))


def default_chunk(batch: int, budget: int = 1 << 21) -> int:
    """Proxies per tile so that a tile (chunk × batch) stays near `budget` entries."""
    return max(1, budget // max(batch, 1))


def proxy_anchor_terms(x_unit, p_unit, labels, alpha: float, margin: float, chunk=None,
                       log_w=None):
    """Per-proxy (pos, neg): log(1 + Σ_{y=c} e^{−α(s−δ) + lw}) and log(1 + Σ_{y≠c} e^{α(s+δ) + lw}),
    lw the examples' log-weights (log_w; none by default)."""
    chunk = default_chunk(x_unit.shape[0]) if chunk is None else chunk
    args = (x_unit.contiguous(), p_unit.contiguous(), labels.contiguous())
    if log_w is not None:
        return call(torch.ops.metrix_ops.proxy_anchor_weighted_fwd,
            *args, log_w.to(x_unit.dtype).contiguous(), float(alpha), float(margin), int(chunk))
    if gradient_wanted_on_cpu(x_unit, p_unit):
        pos, neg, *_ = call(torch.ops.metrix_ops.proxy_anchor_grad_fwd,
            *args, float(alpha), float(margin), int(chunk))
        return pos, neg
    return call(torch.ops.metrix_ops.proxy_anchor_fwd, *args, float(alpha), float(margin),
                int(chunk))
