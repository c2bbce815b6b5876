"""Embedding-level Metrix terms of the proxy losses from the fused streaming ops
(csrc/cpu/proxy_anchor_metrix_cpu.cpp, proxy_nca_metrix_cpu.cpp): fake kernels for
torch.compile, autograd, and the calls. Inputs are unit rows: normalisation and its
gradient stay in PyTorch (O((B+C)·D))."""
from __future__ import annotations

import torch

from ..fused.pair_counts import class_counts
from .. import _ext
from .autograd import call, register_autograd

_PA = "metrix_ops::proxy_anchor_metrix_fwd"
_NCA = "metrix_ops::proxy_nca_metrix_fwd"

if _ext.HAS_EXT:
    @torch.library.register_fake(_PA)
    def _fake_pa(x, p, labels, alpha, margin, lam, same_label, chunk):
        c = p.shape[0]
        return x.new_empty(c), x.new_empty(c)

    @torch.library.register_fake("metrix_ops::proxy_anchor_metrix_bwd")
    def _fake_pa_bwd(grad_pos, grad_neg, x, p, labels, pos, neg, alpha, margin, lam,
                     same_label, chunk):
        return torch.empty_like(x), torch.empty_like(p)

    def _setup_pa(ctx, inputs, output):
        x, p, labels, *args = inputs
        # the terms are the log-sum-exps the backward needs
        ctx.save_for_backward(x, p, labels, output[0], output[1])
        ctx.args = tuple(args)

    def _backward_pa(ctx, g_pos, g_neg):
        x, p, labels, pos, neg = ctx.saved_tensors
        g_pos = torch.zeros_like(pos) if g_pos is None else g_pos.contiguous()
        g_neg = torch.zeros_like(neg) if g_neg is None else g_neg.contiguous()
        dx, dp = torch.ops.metrix_ops.proxy_anchor_metrix_bwd(g_pos, g_neg, x, p, labels, pos,
                                                              neg, *ctx.args)
        return dx, dp, None, None, None, None, None, None

    register_autograd(_PA, _backward_pa, setup_context=_setup_pa)

    @torch.library.register_fake(_NCA)
    def _fake_nca(x, p, labels, scale, kind, lam, same_label, chunk):
        return x.new_empty(x.shape[0])

    @torch.library.register_fake("metrix_ops::proxy_nca_metrix_bwd")
    def _fake_nca_bwd(grad_rows, x, p, labels, scale, kind, lam, same_label, chunk):
        return torch.empty_like(x), torch.empty_like(p)

    def _setup_nca(ctx, inputs, output):
        x, p, labels, *args = inputs
        ctx.save_for_backward(x, p, labels)
        ctx.args = tuple(args)

    def _backward_nca(ctx, g_rows):
        x, p, labels = ctx.saved_tensors
        dx, dp = torch.ops.metrix_ops.proxy_nca_metrix_bwd(g_rows.contiguous(), x, p, labels,
                                                           *ctx.args)
        return dx, dp, None, None, None, None, None, None

    register_autograd(_NCA, _backward_nca, setup_context=_setup_nca)


def default_chunk(batch: int, budget: int = 1 << 20) -> int:
    """Gram rows per block so that a block (chunk × batch) stays near `budget` entries."""
    return max(1, budget // max(batch, 1))


def candidate_count(labels, num_classes: int, same_label: bool) -> torch.Tensor:
    """Ordered pairs u ≠ w of the same label (same_label) or of different labels, as a 0-d
    tensor (no host sync, no graph break under torch.compile)."""
    counts = class_counts(labels, num_classes)
    same = (counts * counts).sum() - len(labels)
    return same if same_label else len(labels) ** 2 - len(labels) - same


def proxy_anchor_metrix_terms(x_unit, p_unit, labels, alpha: float, margin: float, lam: float,
                              same_label: bool, chunk=None):
    """Per-proxy (pos, neg) of the mixed candidates: log(1 + Σ y e^{−α(s−δ)}) and
    log(1 + Σ (1−y) e^{α(s+δ)}), y each candidate's class mass on the proxy."""
    chunk = default_chunk(x_unit.shape[0]) if chunk is None else chunk
    return call(torch.ops.metrix_ops.proxy_anchor_metrix_fwd,
        x_unit.contiguous(), p_unit.contiguous(), labels.contiguous(), float(alpha),
        float(margin), float(lam), bool(same_label), int(chunk))


def proxy_nca_metrix_rows(x_unit, p_unit, labels, scale: float, kind: int, lam: float,
                          same_label: bool, chunk=None):
    """Per row u: Σ over its candidates mix(u, w) of the soft-target cross-entropy."""
    chunk = default_chunk(x_unit.shape[0]) if chunk is None else chunk
    return call(torch.ops.metrix_ops.proxy_nca_metrix_fwd,
        x_unit.contiguous(), p_unit.contiguous(), labels.contiguous(), float(scale), int(kind),
        float(lam), bool(same_label), int(chunk))
