"""HPHN's chosen distances from the mined picks (csrc/cpu/hphn_picks_cpu.cpp): fake kernels
for torch.compile, autograd, and the call. Per anchor the positive's cosine (or squared L2
distance) and the closest point pair's cosine, read from the unit rows in place: no gathered
B×D rows, and a backward that writes the rows' gradient once."""
from __future__ import annotations

import torch

from .. import _ext
from .autograd import call, register_autograd

_FWD = "metrix_ops::hphn_pick_sims"

def register_pick_sims_autograd(fwd_name: str, bwd) -> None:
    """Autograd of a picks op (xu, idx, n_points, l2_pos) -> (pos, s_an): this CPU op's, and
    the Triton engine's (triton/pick_sims.py); bwd(grad_pos, grad_san, xu, idx, n_points,
    l2_pos) -> dxu."""
    def setup_context(ctx, inputs, output):
        xu, idx, n_points, l2_pos = inputs
        ctx.save_for_backward(xu, idx)
        ctx.n_points, ctx.l2_pos = n_points, l2_pos

    def backward(ctx, grad_pos, grad_san):
        xu, idx = ctx.saved_tensors
        # an output not used downstream comes back as None: its gradient is zero
        grad_pos = torch.zeros_like(xu[:, 0]) if grad_pos is None else grad_pos
        grad_san = torch.zeros_like(xu[:, 0]) if grad_san is None else grad_san
        return bwd(grad_pos.contiguous(), grad_san.contiguous(), xu, idx, ctx.n_points,
                   ctx.l2_pos), None, None, None

    register_autograd(fwd_name, backward, setup_context=setup_context)


if _ext.HAS_EXT:
    @torch.library.register_fake(_FWD)
    def _fake(xu, idx, n_points, l2_pos):
        return xu.new_empty(xu.shape[0]), xu.new_empty(xu.shape[0])

    @torch.library.register_fake("metrix_ops::hphn_pick_sims_bwd")
    def _fake_bwd(grad_pos, grad_san, xu, idx, n_points, l2_pos):
        return torch.empty_like(xu)

    register_pick_sims_autograd(
        _FWD, lambda *args: torch.ops.metrix_ops.hphn_pick_sims_bwd(*args))


def hphn_pick_sims(xu: torch.Tensor, idx: torch.Tensor, n_points: int, l2_pos: bool):
    """(pos, s_an) per anchor from the mined picks idx (B × 7 [p, a_u, a_w, a_k, q_u, q_w,
    q_k], −1: none, computed from row 0 as a throw-away value): pos = x̂_b·x̂_p, or
    ‖x̂_b − x̂_p‖² with l2_pos; s_an the cosine of the points lerp(x̂_aw, x̂_au, a_k/(n+1)) and
    lerp(x̂_qw, x̂_qu, q_k/(n+1)) (an original's norm exactly 1)."""
    return call(torch.ops.metrix_ops.hphn_pick_sims, xu.contiguous(), idx.contiguous(),
                                               int(n_points), bool(l2_pos))
