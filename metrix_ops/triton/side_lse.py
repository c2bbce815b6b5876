"""Losses whose anchor term is a function of two per-row log-sum-exps, one over its positive
pairs and one over its negative pairs (CircleLoss, GeneralizedLiftedStructureLoss), on the
Triton engine: one forward kernel, one autograd rule and one pair of custom ops for all of
them, each loss supplying its exponents as a @triton.jit LOGITS function.

LOGITS(s, pos, neg, prm_ptr) -> (positive exponents, negative exponents, their slopes
∂/∂s), −inf off each side. The forward keeps per row and side an online log-sum-exp (an
empty side stays −inf) and returns z = lse⁺ + lse⁻ with the loss's rule for an empty side
(EMPTY_ZERO: a side with no pair adds 0, PML's masked log-sum-exp; otherwise z = −inf),
and the two log-sum-exps. The backward's G tile is c_i·e^{exponent − lse_side}·slope with
c = ∂L/∂z, through the shared gradient kernels of pairs.py (the symmetric kernel for the
batch against itself). Every exponent is taken relative to its running maximum, so Circle's
γ = 256 cannot overflow."""
import torch

from ..ops.autograd import call, register_autograd
import triton
import triton.language as tl

from .launch import triton_op
from .pairs import (fake_grads, grads_or_empty, launch_config, loss_constants, needs_grads,
                    pair_grads)
from .tiles import pair_masks, raw_table, raw_unit_sims, sim_tile


@triton.jit
def lse_fold(m, t, x):
    """An online log-sum-exp per row (max m, Σ e^{·−m}) folding x; an empty row stays
    (−inf, 0)."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    t = t * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
    return m_new, t


@triton.jit
def side_grad(lp, ln, dp, dn, pos, neg, c, lse_p, lse_n):
    """G of a tile from its exponents and slopes, the rows' upstream gradients c of z and
    their log-sum-exps."""
    # an empty side has lse −inf and no entries; keep its exponent finite before the select
    ep = tl.exp(lp - tl.where(lse_p == float("-inf"), 0.0, lse_p)[:, None])
    en = tl.exp(ln - tl.where(lse_n == float("-inf"), 0.0, lse_n)[:, None])
    g = tl.where(pos, ep * dp, tl.where(neg, en * dn, 0.0))
    return c[:, None] * g


@triton.jit
def side_lse_fwd_kernel(x_ptr, r_ptr, lab_ptr, rlab_ptr, prm_ptr, z_ptr, lp_ptr, ln_ptr,
                        raw_ptr, B, M, D, stride_x, stride_r, LOGITS: tl.constexpr,
                        EMPTY_ZERO: tl.constexpr, EXCLUDE_DIAG: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        ACC: tl.constexpr, PRECISION: tl.constexpr, RAW: tl.constexpr = False):
    """RAW: rows of any norm, read at their L2 distances (tiles.raw_unit_sims)."""
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
        if RAW:
            s = raw_unit_sims(s, raw_ptr, offs_m, offs_n, B, M)
        pos, neg = pair_masks(offs_m, offs_n, lab_m, lab_n, B, M, EXCLUDE_DIAG)
        lp, ln, _, _ = LOGITS(s, pos, neg, prm_ptr)
        mp, tp = lse_fold(mp, tp, lp)
        mn, tn = lse_fold(mn, tn, ln)
    # an empty side is −inf (log of a clamped sum, then the select: no log(0))
    lse_p = tl.where(tp > 0, mp + tl.log(tl.maximum(tp, 1e-30)), float("-inf"))
    lse_n = tl.where(tn > 0, mn + tl.log(tl.maximum(tn, 1e-30)), float("-inf"))
    if EMPTY_ZERO:
        z = tl.where(tp > 0, lse_p, 0.0) + tl.where(tn > 0, lse_n, 0.0)
    else:
        z = lse_p + lse_n
    tl.store(z_ptr + offs_m, z, mask=row_ok)
    tl.store(lp_ptr + offs_m, lse_p, mask=row_ok)
    tl.store(ln_ptr + offs_m, lse_n, mask=row_ok)


# kind -> (LOGITS, GRAD_TILE, EMPTY_ZERO), filled by the loss modules (register_kind): the
# custom ops take the kind as an int, so that one op serves every such loss
_KINDS: dict = {}


def register_kind(kind: int, logits, grad_tile, empty_zero: bool):
    _KINDS[kind] = (logits, grad_tile, bool(empty_zero))


def side_lse_launch(kind: int, prm, x, r, labels, ref_labels, exclude_diag: bool,
                    raw: bool = False):
    """The forward kernel on contiguous inputs (int64 labels, constants tensor prm): (z, lse⁺,
    lse⁻) per anchor, for the ops here and for losses built on a side's log-sum-exp. raw:
    rows of any norm at their L2 distances."""
    b = x.shape[0]
    z, lp, ln = (torch.empty(b, dtype=x.dtype, device=x.device) for _ in range(3))
    if b > 0:
        logits, _, empty_zero = _KINDS[kind]
        cfg, _, warps = launch_config(x, r)
        side_lse_fwd_kernel[(triton.cdiv(b, cfg["BLOCK_M"]),)](
            x, r, labels, ref_labels, prm, z, lp, ln, raw_table(x, r) if raw else x, b,
            r.shape[0], x.shape[1], x.stride(0), r.stride(0), LOGITS=logits,
            EMPTY_ZERO=empty_zero, EXCLUDE_DIAG=bool(exclude_diag), RAW=bool(raw), **cfg,
            **warps)
    return z, lp, ln


_FWD = "metrix_ops::triton_side_lse_rows"
_BWD = "metrix_ops::triton_side_lse_rows_bwd"


@triton_op(_FWD)
def _side_lse_rows_op(x: torch.Tensor, r: torch.Tensor, labels: torch.Tensor,
                      ref_labels: torch.Tensor, exclude_diag: bool, kind: int,
                      consts: list[float], symmetric: bool, raw: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z, lse⁺, lse⁻) per anchor; −inf for an empty side. raw: rows of any norm at their
    L2 distances."""
    return side_lse_launch(kind, loss_constants(x, *consts), x.contiguous(), r.contiguous(),
                           labels.contiguous().long(), ref_labels.contiguous().long(),
                           exclude_diag, raw)


@_side_lse_rows_op.register_fake
def _(x, r, labels, ref_labels, exclude_diag, kind, consts, symmetric, raw=False):
    return tuple(x.new_empty(x.shape[0]) for _ in range(3))


@triton_op(_BWD)
def _side_lse_rows_bwd_op(g_z: torch.Tensor, x: torch.Tensor, r: torch.Tensor,
                          labels: torch.Tensor, ref_labels: torch.Tensor, lse_p: torch.Tensor,
                          lse_n: torch.Tensor, exclude_diag: bool, kind: int,
                          consts: list[float], symmetric: bool, raw: bool, need_x: bool,
                          need_r: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x, r = x.contiguous(), r.contiguous()
    if x.shape[0] == 0:
        return grads_or_empty(torch.zeros_like(x) if need_x else None,
                              torch.zeros_like(r) if need_r else None, x)
    _, grad_tile, _ = _KINDS[kind]
    dx, dr = pair_grads(grad_tile, x, r, labels.contiguous().long(),
                        ref_labels.contiguous().long(), loss_constants(x, *consts),
                        (g_z.to(x.dtype).contiguous(), lse_p.contiguous(), lse_n.contiguous()),
                        exclude_diag, symmetric, need_x, need_r, raw=raw)
    return grads_or_empty(dx, dr, x)


@_side_lse_rows_bwd_op.register_fake
def _(g_z, x, r, labels, ref_labels, lse_p, lse_n, exclude_diag, kind, consts, symmetric, raw,
      need_x, need_r):
    return fake_grads(x, r, need_x, need_r)


def _setup(ctx, inputs, output):
    x, r, labels, ref_labels, exclude_diag, kind, consts, symmetric, *raw = inputs
    ctx.save_for_backward(x, r, labels, ref_labels, output[1], output[2])
    ctx.args = (exclude_diag, kind, consts, symmetric, bool(raw and raw[0]))
    ctx.n_inputs = len(inputs)
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, g_z, _g_lp, _g_ln):
    need_x, need_r = needs_grads(ctx, ctx.args[3])
    dx, dr = torch.ops.metrix_ops.triton_side_lse_rows_bwd(g_z, *ctx.saved_tensors, *ctx.args,
                                                          need_x, need_r)
    return ((dx if need_x else None), (dr if need_r else None)) + (None,) * (ctx.n_inputs - 2)


register_autograd(_FWD, _backward, setup_context=_setup)


def side_lse_rows(kind: int, consts, x_unit, r_unit, labels, ref_labels, exclude_diag: bool,
                  symmetric: bool, raw: bool = False):
    """(z, lse⁺, lse⁻) of a registered kind, z differentiable in x_unit and r_unit (raw:
    rows of any norm, at their L2 distances)."""
    return call(torch.ops.metrix_ops.triton_side_lse_rows,
        x_unit, r_unit, labels, ref_labels, bool(exclude_diag), int(kind),
        [float(c) for c in consts], bool(symmetric), bool(raw))
