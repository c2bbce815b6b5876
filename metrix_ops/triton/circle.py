"""CircleLoss on the Triton engine (backend="triton"): per anchor of unit rows X against unit
references R, PML's pair-label form (common/circle.h)

    softplus(lse_P(−γ[O_p − s]₊(s − Δ_p)) + lse_N(γ[s − O_n]₊(s − Δ_n))),

O_p = 1 + m, O_n = −m, Δ_p = 1 − m, Δ_n = m, the weights [·]₊ detached (the paper, PML).
Flash-attention style as multi_similarity.py: the forward keeps per row and side an online
log-sum-exp (empty sides stay −inf, and an anchor lacking a side gives softplus(−inf) = 0);
the backward's G tile is c_i · e^{logit − lse_side} · ∂logit/∂s with c_i = g_i ·
softplus'(z_i) (torch's threshold 20) and ∂logit/∂s = −γ[O_p − s]₊ on positives,
γ[s − O_n]₊ on negatives, through the shared gradient kernels of pairs.py (symmetric
kernel for the batch against itself). γ = 256 is fine: every exponent is relative to its
running maximum. Reduction and PML's no-pairs rule are the CPU glue's (fused/ntxent.py)."""
import torch
import triton
import triton.language as tl

from .. import fused
from ..distances import is_cosine
from ..fused.ntxent import guarded, reduce_rows, unit_pair
from .launch import usable_on
from .pairs import (fake_grads, grads_or_empty, is_symmetric, launch_config, loss_constants,
                    max_dim, needs_grads, pair_grads)
from .tiles import pair_masks, sim_tile


@triton.jit
def _circle_logits(s, pos, neg, prm_ptr):
    """(positive logits, negative logits) of a tile, −inf off each side, and the slopes
    ∂logit/∂s with the weights detached."""
    gamma, op, on = tl.load(prm_ptr), tl.load(prm_ptr + 1), tl.load(prm_ptr + 2)
    dp, dn = tl.load(prm_ptr + 3), tl.load(prm_ptr + 4)
    wp = gamma * tl.maximum(op - s, 0.0)
    wn = gamma * tl.maximum(s - on, 0.0)
    lp = tl.where(pos, -wp * (s - dp), float("-inf"))
    ln = tl.where(neg, wn * (s - dn), float("-inf"))
    return lp, ln, -wp, wn


@triton.jit
def _lse_fold(m, t, x):
    """An online log-sum-exp per row (max m, Σ e^{·−m}) folding x; an empty row stays
    (−inf, 0)."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    t = t * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
    return m_new, t


@triton.jit
def _circle_grad_tile(s, pos, neg, c, lse_p, lse_n, prm_ptr):
    """G = ∂L/∂S of a tile from the rows' upstream gradients c of z = lse_P + lse_N and their
    log-sum-exps (pairs.py's GRAD_TILE)."""
    lp, ln, dp, dn = _circle_logits(s, pos, neg, prm_ptr)
    # an empty side has lse −inf and no entries; keep its exponent finite before the select
    ep = tl.exp(lp - tl.where(lse_p == float("-inf"), 0.0, lse_p)[:, None])
    en = tl.exp(ln - tl.where(lse_n == float("-inf"), 0.0, lse_n)[:, None])
    g = tl.where(pos, ep * dp, tl.where(neg, en * dn, 0.0))
    return c[:, None] * g


@triton.jit
def _circle_fwd_kernel(x_ptr, r_ptr, lab_ptr, rlab_ptr, prm_ptr, lp_ptr, ln_ptr, B, M, D,
                       stride_x, stride_r, EXCLUDE_DIAG: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
                       PRECISION: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < B
    lab_m = tl.load(lab_ptr + offs_m, mask=row_ok, other=0)
    mp = tl.full((BLOCK_M,), float("-inf"), ACC)
    mn = tl.full((BLOCK_M,), float("-inf"), ACC)
    tp = tl.zeros((BLOCK_M,), ACC)
    tn = tl.zeros((BLOCK_M,), ACC)
    for n0 in range(0, M, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        lab_n = tl.load(rlab_ptr + offs_n, mask=offs_n < M, other=0)
        s = sim_tile(x_ptr, r_ptr, offs_m, offs_n, B, M, D, stride_x, stride_r,
                     BLOCK_M, BLOCK_N, BLOCK_D, ACC, PRECISION)
        pos, neg = pair_masks(offs_m, offs_n, lab_m, lab_n, B, M, EXCLUDE_DIAG)
        lp, ln, _, _ = _circle_logits(s, pos, neg, prm_ptr)
        mp, tp = _lse_fold(mp, tp, lp)
        mn, tn = _lse_fold(mn, tn, ln)
    # an empty side is −inf (log of a clamped sum, then the select: no log(0))
    lse_p = tl.where(tp > 0, mp + tl.log(tl.maximum(tp, 1e-30)), float("-inf"))
    lse_n = tl.where(tn > 0, mn + tl.log(tl.maximum(tn, 1e-30)), float("-inf"))
    tl.store(lp_ptr + offs_m, lse_p, mask=row_ok)
    tl.store(ln_ptr + offs_m, lse_n, mask=row_ok)


def _constants(x, m, gamma):
    # γ, O_p, O_n, Δ_p, Δ_n from Python floats, as PML (and common/circle.h) computes them
    return loss_constants(x, gamma, 1 + m, -m, 1 - m, m)


_FWD = "metrix_ops::triton_circle_rows"
_BWD = "metrix_ops::triton_circle_rows_bwd"


@torch.library.custom_op(_FWD, mutates_args=())
def _circle_rows_op(x: torch.Tensor, r: torch.Tensor, labels: torch.Tensor,
                    ref_labels: torch.Tensor, exclude_diag: bool, m: float, gamma: float,
                    symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z = lse_P + lse_N, lse_P, lse_N) per anchor; −inf for an empty side."""
    x, r = x.contiguous(), r.contiguous()
    b = x.shape[0]
    lp, ln = (torch.empty(b, dtype=x.dtype, device=x.device) for _ in range(2))
    if b > 0:
        cfg, _, warps = launch_config(x, r)
        _circle_fwd_kernel[(triton.cdiv(b, cfg["BLOCK_M"]),)](
            x, r, labels.contiguous().long(), ref_labels.contiguous().long(),
            _constants(x, m, gamma), lp, ln, b, r.shape[0], x.shape[1], x.stride(0),
            r.stride(0), EXCLUDE_DIAG=bool(exclude_diag), **cfg, **warps)
    return lp + ln, lp, ln


@_circle_rows_op.register_fake
def _(x, r, labels, ref_labels, exclude_diag, m, gamma, symmetric):
    return tuple(x.new_empty(x.shape[0]) for _ in range(3))


@torch.library.custom_op(_BWD, mutates_args=())
def _circle_rows_bwd_op(g_z: torch.Tensor, x: torch.Tensor, r: torch.Tensor,
                        labels: torch.Tensor, ref_labels: torch.Tensor, lse_p: torch.Tensor,
                        lse_n: torch.Tensor, exclude_diag: bool, m: float, gamma: float,
                        symmetric: bool, need_x: bool, need_r: bool
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    x, r = x.contiguous(), r.contiguous()
    if x.shape[0] == 0:
        return grads_or_empty(torch.zeros_like(x) if need_x else None,
                              torch.zeros_like(r) if need_r else None, x)
    dx, dr = pair_grads(_circle_grad_tile, x, r, labels.contiguous().long(),
                        ref_labels.contiguous().long(), _constants(x, m, gamma),
                        (g_z.to(x.dtype).contiguous(), lse_p.contiguous(), lse_n.contiguous()),
                        exclude_diag, symmetric, need_x, need_r)
    return grads_or_empty(dx, dr, x)


@_circle_rows_bwd_op.register_fake
def _(g_z, x, r, labels, ref_labels, lse_p, lse_n, exclude_diag, m, gamma, symmetric, need_x,
      need_r):
    return fake_grads(x, r, need_x, need_r)


def _setup(ctx, inputs, output):
    x, r, labels, ref_labels, *consts = inputs
    ctx.save_for_backward(x, r, labels, ref_labels, output[1], output[2])
    ctx.consts = tuple(consts)
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, g_z, _g_lp, _g_ln):
    need_x, need_r = needs_grads(ctx, ctx.consts[-1])
    dx, dr = torch.ops.metrix_ops.triton_circle_rows_bwd(g_z, *ctx.saved_tensors, *ctx.consts,
                                                        need_x, need_r)
    return ((dx if need_x else None), (dr if need_r else None)) + (None,) * 6


torch.library.register_autograd(_FWD, _backward, setup_context=_setup)


def circle_rows_triton(x_unit, r_unit, labels, ref_labels, exclude_diag: bool, m: float,
                       gamma: float) -> torch.Tensor:
    """Per-anchor Circle terms softplus(lse_P + lse_N) (0 for an anchor lacking a side) of
    unit rows against unit references, differentiable in both; the batch against itself
    (r_unit *is* x_unit) takes the symmetric gradient kernel."""
    z, _, _ = torch.ops.metrix_ops.triton_circle_rows(
        x_unit, r_unit, labels, ref_labels, bool(exclude_diag), float(m), float(gamma),
        is_symmetric(x_unit, r_unit, labels, ref_labels, exclude_diag))
    return torch.nn.functional.softplus(z, beta=1, threshold=20)


def supports(params, inp, expansion) -> bool:
    x = inp.embeddings
    return (expansion is None and inp.indices_tuple is None and inp.labels is not None
            and is_cosine(inp.distance) and x.shape[1] <= max_dim(x.dtype)
            and usable_on(x.device))


def impl(params, inp, reducer):
    def compute(_n_pos):
        xu, ru = unit_pair(inp)
        rows = circle_rows_triton(xu, ru, inp.labels, inp.ref_labels, inp.same_set,
                                  params["m"], params["gamma"])
        return reduce_rows(rows, reducer, inp.embeddings)

    # PML: zero unless some pair list has two entries; an anchor lacking a side gives 0
    return guarded(compute, inp, need_both=False)


fused.register("triton", "CircleLoss", supports, impl)
