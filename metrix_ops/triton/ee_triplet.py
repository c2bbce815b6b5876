"""TripletMarginLoss ("all" triplets) with Embedding Expansion on the Triton engine: per anchor
i, over its positives p and every negative point q (originals and synthetic points of other
classes, each scored by its closest pair),

    (Σ f(v), #f > 0, #triplets),   v = margin(pos_ip, m̂(i, q)) + margin, f relu or softplus,

the CPU engine's ee_triplet op (csrc/cpu/ee_losses_cpu.cpp), so the loss shares its glue
(fused/ee_losses.triplet_margin). It runs the kernels of ee_neg_lse.py in their MODE 1: the
same chunks of whole classes, point tiles and closest-pair selection; where MODE 0 takes an
exp per (anchor, point), this takes a KP × BQ tile over the anchor's positives (≤ 63, as a
class has ≤ 64 rows). No triplet list, no B×P table. The backward recomputes ŝ as MODE 0
does; its anchor-side pass also writes ∂L/∂pos, each anchor's entries by its own chunk's
program (one writer, no atomics)."""
from __future__ import annotations

import torch

from ..ops.autograd import call, register_autograd
from .ee_neg_lse import _params, launch_bwd, launch_fwd, layout_tables, prepare
from .launch import triton_op

_FWD = "metrix_ops::triton_ee_triplet_fwd"
_BWD = "metrix_ops::triton_ee_triplet_bwd"


@triton_op(_FWD, host_reads=True)
def _fwd_op(xs: torch.Tensor, pnorm: torch.Tensor, pos: torch.Tensor,
            layout: list[torch.Tensor], pst: torch.Tensor, pct: torch.Tensor, n: int, l2: bool,
            margin: float, smooth: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b = xs.shape[0]
    sums = xs.new_zeros(b)
    nz = torch.zeros(b, dtype=torch.int64, device=xs.device)
    ct = torch.zeros_like(nz)
    if b > 0:
        tables, sizes = layout_tables(layout, n)
        launch_fwd(xs, pnorm, tables, sizes, l2, _params(xs, 1.0, 0.0, margin), sums,
                   (pos, pst, pct, smooth), nz, ct)
    return sums, nz, ct


@_fwd_op.register_fake
def _(xs, pnorm, pos, layout, pst, pct, n, l2, margin, smooth):
    b = xs.shape[0]
    return (xs.new_empty(b), xs.new_empty(b, dtype=torch.long),
            xs.new_empty(b, dtype=torch.long))


@triton_op(_BWD, host_reads=True)
def _bwd_op(grad: torch.Tensor, xs: torch.Tensor, pnorm: torch.Tensor, pos: torch.Tensor,
            layout: list[torch.Tensor], pst: torch.Tensor, pct: torch.Tensor, n: int, l2: bool,
            margin: float, smooth: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dpos = torch.zeros_like(pos)
    if xs.shape[0] == 0:
        return torch.zeros_like(xs), torch.zeros_like(pnorm), dpos
    tables, sizes = layout_tables(layout, n, backward=True)
    dx, dpn = launch_bwd(grad, xs.new_zeros(xs.shape[0]), xs, pnorm, tables, sizes, l2,
                         _params(xs, 1.0, 0.0, margin), (pos, pst, pct, smooth), dpos)
    return dx, dpn, dpos


@_bwd_op.register_fake
def _(grad, xs, pnorm, pos, layout, pst, pct, n, l2, margin, smooth):
    return torch.empty_like(xs), torch.empty_like(pnorm), torch.empty_like(pos)


def _setup(ctx, inputs, output):
    xs, pnorm, pos, layout, pst, pct, *consts = inputs
    ctx.save_for_backward(xs, pnorm, pos, pst, pct, *layout)
    ctx.consts = tuple(consts)
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, grad, _g_nonzero, _g_count):
    xs, pnorm, pos, pst, pct, *layout = ctx.saved_tensors
    dx, dpn, dpos = torch.ops.metrix_ops.triton_ee_triplet_bwd(
        grad.contiguous(), xs, pnorm, pos, list(layout), pst, pct, *ctx.consts)
    return dx, dpn, dpos, [None] * len(layout), None, None, None, None, None, None


register_autograd(_FWD, _backward, setup_context=_setup)


def ee_triplet_triton(x_unit, labels, seg_i, seg_j, pos, n_points: int, l2: bool,
                      margin: float, smooth: bool):
    """ops.ee_losses.ee_triplet on the Triton engine: per anchor in the caller's order
    (Σ f, #f > 0, #triplets); `pos`: each anchor's clean metric to its positives (the other
    members of its class in index order), anchor-major. Differentiable in x_unit and pos.
    Units of at most EE_MAX_CLASS rows (ee_neg_lse.covers)."""
    order, slot, xs, layout, pnorm = prepare(x_unit, labels, seg_i, seg_j, n_points)
    _, inv, counts = torch.unique(labels.long(), return_inverse=True, return_counts=True)
    npos = counts[inv] - 1  # per anchor: its class's other members
    start = torch.cumsum(npos, 0) - npos
    if not torch.compiler.is_compiling() and pos.shape != (int(npos.sum()),):
        raise ValueError(f"pos must have shape ({int(npos.sum())},): each anchor's clean metric "
                         f"to its positives, got {tuple(pos.shape)}")
    i32 = torch.int32
    sums, nz, ct = call(torch.ops.metrix_ops.triton_ee_triplet_fwd,
        xs, pnorm, pos.to(xs.dtype).contiguous(), layout, start[order].to(i32).contiguous(),
        npos[order].to(i32).contiguous(), int(n_points), bool(l2), float(margin), bool(smooth))
    return sums.index_select(0, slot), nz.index_select(0, slot), ct.index_select(0, slot)
