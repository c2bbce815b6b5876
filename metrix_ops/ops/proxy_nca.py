"""ProxyNCA per-example terms from the fused streaming op (csrc/cpu/proxy_nca_cpu.cpp):
fake kernel for torch.compile, autograd, and the call. Inputs are unit rows: normalisation
and its gradient stay in PyTorch."""
from __future__ import annotations

import torch

from .. import _ext
from .autograd import call, register_autograd
from .proxy_anchor import default_chunk, gradient_wanted_on_cpu

_FWD = "metrix_ops::proxy_nca_fwd"
COSINE, SQUARED_L2 = 0, 1  # the op's `kind`: logit = scale·s, or −scale·(2 − 2s)

if _ext.HAS_EXT:
    @torch.library.register_fake(_FWD)
    def _fake(x, p, labels, scale, kind, chunk):
        b = x.shape[0]
        return x.new_empty(b), x.new_empty(b)

    @torch.library.register_fake("metrix_ops::proxy_nca_bwd")
    def _fake_bwd(grad_rows, x, p, labels, lse, scale, kind, chunk):
        return torch.empty_like(x), torch.empty_like(p)

    def _setup_context(ctx, inputs, output):
        x, p, labels, scale, kind, chunk = inputs
        ctx.save_for_backward(x, p, labels, output[1])
        ctx.args = (scale, kind, chunk)
        ctx.mark_non_differentiable(output[1])

    def _backward(ctx, g_rows, _g_lse):
        x, p, labels, lse = ctx.saved_tensors
        dx, dp = torch.ops.metrix_ops.proxy_nca_bwd(g_rows.contiguous(), x, p, labels, lse,
                                                    *ctx.args)
        return dx, dp, None, None, None, None

    register_autograd(_FWD, _backward, setup_context=_setup_context)

    # proxy_nca_grad_fwd: the same rows, and their gradient at unit upstream gradient formed
    # in the forward pass (csrc/cpu/proxy_nca_cpu.cpp); the backward scales or recomputes it
    _GFWD = "metrix_ops::proxy_nca_grad_fwd"

    @torch.library.register_fake(_GFWD)
    def _fake_grad_fwd(x, p, labels, scale, kind, chunk):
        b = x.shape[0]
        return x.new_empty(b), x.new_empty(b), torch.empty_like(x), torch.empty_like(p)

    @torch.library.register_fake("metrix_ops::proxy_nca_grad_bwd")
    def _fake_grad_bwd(grad_rows, x, p, *rest):
        return torch.empty_like(x), torch.empty_like(p)

    def _setup_grad_context(ctx, inputs, output):
        x, p, labels, scale, kind, chunk = inputs
        ctx.save_for_backward(x, p, labels, *output[1:])
        ctx.args = (scale, kind, chunk)
        ctx.mark_non_differentiable(*output[1:])

    def _grad_backward(ctx, g_rows, *_):
        x, p, labels, lse, dx1, dp1 = ctx.saved_tensors
        dx, dp = torch.ops.metrix_ops.proxy_nca_grad_bwd(g_rows.contiguous(), x, p, labels, lse,
                                                         dx1, dp1, *ctx.args)
        return dx, dp, None, None, None, None

    register_autograd(_GFWD, _grad_backward, setup_context=_setup_grad_context)


def proxy_nca_rows(x_unit, p_unit, labels, scale: float, kind: int, chunk=None):
    """Per example: logsumexp over proxies of the logits − the logit of its own proxy."""
    chunk = default_chunk(p_unit.shape[0]) if chunk is None else chunk
    args = (x_unit.contiguous(), p_unit.contiguous(), labels.contiguous(), float(scale),
            int(kind), int(chunk))
    if gradient_wanted_on_cpu(x_unit, p_unit):
        return call(torch.ops.metrix_ops.proxy_nca_grad_fwd, *args)[0]
    return call(torch.ops.metrix_ops.proxy_nca_fwd, *args)[0]
