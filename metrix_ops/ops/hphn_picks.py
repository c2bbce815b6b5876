"""HPHN's chosen distances from the mined picks (csrc/cpu/hphn_picks_cpu.cpp): fake kernels
for torch.compile, autograd, and the call. Per anchor the positive's cosine (or squared L2
distance) and the closest point pair's cosine, read from the unit rows in place: no gathered
B×D rows, and a backward that writes the rows' gradient once."""
from __future__ import annotations

import torch

from .. import _ext
from .autograd import call, register_autograd

_FWD = "metrix_ops::hphn_pick_sims"

if _ext.HAS_EXT:
    @torch.library.register_fake(_FWD)
    def _fake(xu, idx, n_points, l2_pos):
        return xu.new_empty(xu.shape[0]), xu.new_empty(xu.shape[0])

    @torch.library.register_fake("metrix_ops::hphn_pick_sims_bwd")
    def _fake_bwd(grad_pos, grad_san, xu, idx, n_points, l2_pos):
        return torch.empty_like(xu)

    def _setup_context(ctx, inputs, output):
        xu, idx, n_points, l2_pos = inputs
        ctx.save_for_backward(xu, idx)
        ctx.n_points, ctx.l2_pos = n_points, l2_pos

    def _backward(ctx, grad_pos, grad_san):
        xu, idx = ctx.saved_tensors
        # an output not used downstream comes back as None: its gradient is zero
        grad_pos = torch.zeros_like(xu[:, 0]) if grad_pos is None else grad_pos
        grad_san = torch.zeros_like(xu[:, 0]) if grad_san is None else grad_san
        dx = torch.ops.metrix_ops.hphn_pick_sims_bwd(grad_pos.contiguous(), grad_san.contiguous(),
                                                     xu, idx, ctx.n_points, ctx.l2_pos)
        return dx, None, None, None

    register_autograd(_FWD, _backward, setup_context=_setup_context)


def hphn_pick_sims(xu: torch.Tensor, idx: torch.Tensor, n_points: int, l2_pos: bool):
    """(pos, s_an) per anchor from the mined picks idx (B × 7 [p, a_u, a_w, a_k, q_u, q_w,
    q_k], −1: none, computed from row 0 as a throw-away value): pos = x̂_b·x̂_p, or
    ‖x̂_b − x̂_p‖² with l2_pos; s_an the cosine of the points lerp(x̂_aw, x̂_au, a_k/(n+1)) and
    lerp(x̂_qw, x̂_qu, q_k/(n+1)) (an original's norm exactly 1)."""
    return call(torch.ops.metrix_ops.hphn_pick_sims, xu.contiguous(), idx.contiguous(),
                                               int(n_points), bool(l2_pos))
