"""TripletMarginLoss over the triplets a TripletMarginMiner keeps, from the fused streaming
op (csrc/cpu/triplet_mined_cpu.cpp): fake kernels for torch.compile, autograd, the call.
Inputs are unit rows; normalisation and its gradient stay in PyTorch (O(B·D))."""
from __future__ import annotations

import torch

from .. import _ext
from .autograd import call, register_autograd

_FWD = "metrix_ops::triplet_mined_fwd"
# TripletMarginMiner's type_of_triplets -> the op's mine_kind
MINE_KINDS = {"all": 0, "hard": 1, "semihard": 2, "easy": 3}


def _acc(x):  # the op computes fp16/bf16 in fp32
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# False with an extension built before this op existed: the loss option then takes the
# miner's index tuple instead (fused/triplet_margin.py checks it)
HAS_OP = _ext.has_op("triplet_mined_fwd")

if HAS_OP:
    @torch.library.register_fake(_FWD)
    def _fake(x, r, labels, ref_labels, exclude_diag, cosine, margin, mine_kind, mine_margin,
              smooth, chunk, raw_sq=False):
        b = x.shape[0]
        return (x.new_empty(b, dtype=_acc(x)), labels.new_empty(b), labels.new_empty(b))

    @torch.library.register_fake("metrix_ops::triplet_mined_bwd")
    def _fake_bwd(grad_rows, x, r, labels, ref_labels, exclude_diag, cosine, margin, mine_kind,
                  mine_margin, smooth, chunk, raw_sq=False):
        return torch.empty_like(x), torch.empty_like(r)

    def _setup_context(ctx, inputs, output):
        x, r, labels, ref_labels, *args = inputs
        ctx.save_for_backward(x, r, labels, ref_labels)
        ctx.args = tuple(args)
        ctx.mark_non_differentiable(output[1], output[2])

    def _backward(ctx, g_rows, _g_nonzero, _g_kept):
        x, r, labels, ref_labels = ctx.saved_tensors
        dx, dr = torch.ops.metrix_ops.triplet_mined_bwd(g_rows.contiguous(), x, r, labels,
                                                        ref_labels, *ctx.args)
        return (dx, dr) + (None,) * (2 + len(ctx.args))

    register_autograd(_FWD, _backward, setup_context=_setup_context)


def triplet_mined_rows(x_unit, r_unit, labels, ref_labels, exclude_diag: bool, cosine: bool,
                       margin: float, type_of_triplets: str, mine_margin: float,
                       smooth: bool = False, chunk: int = 256, raw_sq: bool = False):
    """Per anchor (Σ [violation]₊, #kept triplets with loss > 0, #kept triplets) over the
    triplets TripletMarginMiner(mine_margin, type_of_triplets) keeps, on the same distance
    as the loss (`cosine`, else the L2 distance of unit or raw rows; raw_sq as
    triplet_all_rows); softplus(violation) terms when `smooth` (smooth_loss). Memory
    O(chunk·M)."""
    if type_of_triplets not in MINE_KINDS:
        raise ValueError(f"type_of_triplets must be one of {sorted(MINE_KINDS)}, got "
                         f"{type_of_triplets!r}")
    return call(torch.ops.metrix_ops.triplet_mined_fwd,
        x_unit.contiguous(), r_unit.contiguous(), labels.long().contiguous(),
        ref_labels.long().contiguous(), bool(exclude_diag), bool(cosine), float(margin),
        MINE_KINDS[type_of_triplets], float(mine_margin), bool(smooth), int(chunk),
        *((True,) if raw_sq else ()))
