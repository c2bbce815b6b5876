"""Proxy-anchor per-proxy terms from the fused streaming op (csrc/cpu/proxy_anchor_cpu.cpp):
fake kernel for torch.compile, autograd, and the call. Inputs are unit rows: normalisation
and its gradient stay in PyTorch (O((B+C)·D))."""
from __future__ import annotations

import torch

from .. import _ext

_FWD = "metrix_ops::proxy_anchor_fwd"
_WFWD = "metrix_ops::proxy_anchor_weighted_fwd"

if _ext.HAS_EXT:
    @torch.library.register_fake(_FWD)
    def _fake(x, p, labels, alpha, margin, chunk):
        c = p.shape[0]
        return x.new_empty(c), x.new_empty(c)

    @torch.library.register_fake("metrix_ops::proxy_anchor_bwd")
    def _fake_bwd(grad_pos, grad_neg, x, p, labels, pos, neg, alpha, margin, chunk):
        return torch.empty_like(x), torch.empty_like(p)

    def _setup_context(ctx, inputs, output):
        x, p, labels, alpha, margin, chunk = inputs
        # the terms are the log-sum-exps the backward needs
        ctx.save_for_backward(x, p, labels, output[0], output[1])
        ctx.args = (alpha, margin, chunk)

    def _backward(ctx, g_pos, g_neg):
        x, p, labels, pos, neg = ctx.saved_tensors
        g_pos = torch.zeros_like(pos) if g_pos is None else g_pos.contiguous()
        g_neg = torch.zeros_like(neg) if g_neg is None else g_neg.contiguous()
        dx, dp = torch.ops.metrix_ops.proxy_anchor_bwd(g_pos, g_neg, x, p, labels, pos, neg,
                                                       *ctx.args)
        return dx, dp, None, None, None, None

    torch.library.register_autograd(_FWD, _backward, setup_context=_setup_context)

    # the same with per-example log-weights added to the exponents (not differentiated: they
    # come from an index tuple's counts)
    @torch.library.register_fake(_WFWD)
    def _fake_w(x, p, labels, log_w, alpha, margin, chunk):
        c = p.shape[0]
        return x.new_empty(c), x.new_empty(c)

    @torch.library.register_fake("metrix_ops::proxy_anchor_weighted_bwd")
    def _fake_w_bwd(grad_pos, grad_neg, x, p, labels, log_w, pos, neg, alpha, margin, chunk):
        return torch.empty_like(x), torch.empty_like(p)

    def _setup_w(ctx, inputs, output):
        x, p, labels, log_w, alpha, margin, chunk = inputs
        ctx.save_for_backward(x, p, labels, log_w, output[0], output[1])
        ctx.args = (alpha, margin, chunk)

    def _backward_w(ctx, g_pos, g_neg):
        x, p, labels, log_w, pos, neg = ctx.saved_tensors
        g_pos = torch.zeros_like(pos) if g_pos is None else g_pos.contiguous()
        g_neg = torch.zeros_like(neg) if g_neg is None else g_neg.contiguous()
        dx, dp = torch.ops.metrix_ops.proxy_anchor_weighted_bwd(g_pos, g_neg, x, p, labels,
                                                                log_w, pos, neg, *ctx.args)
        return dx, dp, None, None, None, None, None

    torch.library.register_autograd(_WFWD, _backward_w, setup_context=_setup_w)


def default_chunk(batch: int, budget: int = 1 << 21) -> int:
    """Proxies per tile so that a tile (chunk × batch) stays near `budget` entries."""
    return max(1, budget // max(batch, 1))


def proxy_anchor_terms(x_unit, p_unit, labels, alpha: float, margin: float, chunk=None,
                       log_w=None):
    """Per-proxy (pos, neg): log(1 + Σ_{y=c} e^{−α(s−δ) + lw}) and log(1 + Σ_{y≠c} e^{α(s+δ) + lw}),
    lw the examples' log-weights (log_w, CPU only; none by default)."""
    chunk = default_chunk(x_unit.shape[0]) if chunk is None else chunk
    args = (x_unit.contiguous(), p_unit.contiguous(), labels.contiguous())
    if log_w is not None:
        return torch.ops.metrix_ops.proxy_anchor_weighted_fwd(
            *args, log_w.to(x_unit.dtype).contiguous(), float(alpha), float(margin), int(chunk))
    return torch.ops.metrix_ops.proxy_anchor_fwd(*args, float(alpha), float(margin), int(chunk))
