"""All-triplets margin loss from the fused streaming op (csrc/cpu/triplet_cpu.cpp): fake
kernels for torch.compile, autograd, and the call. Inputs are unit rows (normalisation and
its gradient stay in PyTorch, O(B·D)), or for L2 any rows: the op reads the distance through
torch.cdist and its backward gives cdist's gradient (fused/raw_l2.py); raw_sq reads the
squared L2 of any rows as the cosine 1 − d²/2 of that d."""
from __future__ import annotations

import torch

from .. import _ext
from .autograd import call, register_autograd

_FWD = "metrix_ops::triplet_all_fwd"


def _acc(x):  # the op computes fp16/bf16 in fp32
    return torch.float64 if x.dtype == torch.float64 else torch.float32


if _ext.HAS_EXT:
    @torch.library.register_fake(_FWD)
    def _fake(x, r, labels, ref_labels, exclude_diag, cosine, margin, chunk, raw_sq=False):
        b = x.shape[0]
        return (x.new_empty(b, dtype=_acc(x)), labels.new_empty(b), labels.new_empty(b))

    @torch.library.register_fake("metrix_ops::triplet_all_bwd")
    def _fake_bwd(grad_rows, x, r, labels, ref_labels, exclude_diag, cosine, margin, chunk,
                  raw_sq=False):
        return torch.empty_like(x), torch.empty_like(r)

    def _setup_context(ctx, inputs, output):
        x, r, labels, ref_labels, *args = inputs
        ctx.save_for_backward(x, r, labels, ref_labels)
        ctx.args = tuple(args)  # (with raw_sq when given, or filled in by the schema)
        ctx.mark_non_differentiable(output[1], output[2])

    def _backward(ctx, g_rows, _g_nonzero, _g_triplets):
        x, r, labels, ref_labels = ctx.saved_tensors
        dx, dr = torch.ops.metrix_ops.triplet_all_bwd(g_rows.contiguous(), x, r, labels,
                                                      ref_labels, *ctx.args)
        return (dx, dr) + (None,) * (2 + len(ctx.args))

    register_autograd(_FWD, _backward, setup_context=_setup_context)


def triplet_all_rows(x_unit, r_unit, labels, ref_labels, exclude_diag: bool, cosine: bool,
                     margin: float, chunk: int = 256, raw_sq: bool = False):
    """Per-anchor (Σ_{p,n} [violation]₊, #triplets with loss > 0, #triplets) over all
    triplets of anchors x against references r; `cosine` picks cosine similarity (of unit
    rows), else the L2 distance (of any rows); raw_sq (with cosine): the cosine keys of
    1 − d²/2, d the L2 of any rows. Memory O(chunk·M) besides the inputs."""
    return call(torch.ops.metrix_ops.triplet_all_fwd,
        x_unit.contiguous(), r_unit.contiguous(), labels.long().contiguous(),
        ref_labels.long().contiguous(), bool(exclude_diag), bool(cosine), float(margin),
        int(chunk), *((True,) if raw_sq else ()))
