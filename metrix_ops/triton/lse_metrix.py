"""Embedding-level Metrix for the losses whose mixed term is a function of each anchor's two
log-sum-exps over its candidates, one of positive-side exponents and one of negative-side
exponents (CircleLoss, GeneralizedLiftedStructureLoss), on the Triton engine: one forward
kernel, one pair of custom ops and one autograd rule, each loss supplying its candidate
exponents as a @triton.jit LOGITS function (the Metrix counterpart of side_lse.py).

LOGITS(v, ok, prm_ptr) -> (positive exponents, negative exponents, their slopes ∂/∂s̃) of a
KB×KB×BLOCK_N candidate tensor v = s̃ (metrix_tiles.candidate_tile), −inf off the
candidates; prm_ptr holds λ first (metrix_tiles' rule), then the loss's constants. The
forward keeps per anchor two online log-sum-exps from −inf (an anchor without a candidate
keeps −inf on both sides) and returns (z, lse⁺, lse⁻), z = lse⁺ + lse⁻ with an empty side
adding 0; the loss's glue applies its label weights, empty-side rule and reduction in torch. The backward's candidate weight
is g_a (e^{x⁺ − lse⁺} ∂x⁺/∂s̃ + e^{x⁻ − lse⁻} ∂x⁻/∂s̃), g the upstream gradient of
lse⁺ + lse⁻, through metrix_tiles' shared gradient kernels: both sides take the same
upstream weight, which is what these losses' finishing rules give."""
import math

import torch
import triton
import triton.language as tl

from .launch import triton_op
from .metrix_tiles import (candidate_tile, chunk_launch, chunk_rows, fold3, mix_grads, pos_block,
                           register_lse_autograd, run_sorted)
from .pairs import loss_constants


@triton.jit
def lse_mix_weights(xp, xn, dp, dn, ok, g, lp, ln):
    """w = ∂L/∂s̃ per candidate from its exponents and slopes, the anchors' upstream
    gradients g and log-sum-exps (a loss's WEIGHTS calls this on its LOGITS)."""
    lp0 = tl.where(lp == float("-inf"), 0.0, lp)  # no candidate: every term is masked
    ln0 = tl.where(ln == float("-inf"), 0.0, ln)
    w = tl.exp(xp - lp0[:, None, None]) * dp + tl.exp(xn - ln0[:, None, None]) * dn
    return tl.where(ok, g[:, None, None] * w, 0.0)


@triton.jit
def lse_mix_fwd_kernel(x_ptr, lab_ptr, cnt_ptr, chunk_ptr, prm_ptr, lp_ptr, ln_ptr, B, D,
                       stride_x, LOGITS: tl.constexpr, ANCHOR_NEG: tl.constexpr,
                       SPLIT: tl.constexpr, KB: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr):
    offs_k, a1, lab_k, cnt_k, p0, p1 = chunk_rows(chunk_ptr, tl.program_id(0), lab_ptr, cnt_ptr,
                                                  KB)
    lam = tl.load(prm_ptr)
    mp = tl.full((KB,), float("-inf"), ACC)
    mn = tl.full((KB,), float("-inf"), ACC)
    tp = tl.zeros((KB,), ACC)
    tn = tl.zeros((KB,), ACC)
    for p in range(p0, p1, KB):
        offs_p, lab_p, pm, sap = pos_block(x_ptr, lab_ptr, offs_k, a1, lab_k, cnt_k, p, p1, D,
                                       stride_x, ANCHOR_NEG, KB, BLOCK_D, ACC, PRECISION)
        for n0 in range(0, B, BLOCK_N):
            v, ok, r, offs_n, s_a, s_p, lab_n = candidate_tile(
                x_ptr, lab_ptr, offs_k, a1, lab_k, offs_p, p1, pm, sap, n0, B, D, stride_x, lam,
                SPLIT, KB, BLOCK_N, BLOCK_D, ACC, PRECISION)
            xp, xn, _, _ = LOGITS(v, ok, prm_ptr)
            mp, tp = fold3(mp, tp, xp)
            mn, tn = fold3(mn, tn, xn)
    row_ok = offs_k < a1
    # no candidate: −inf (a clamped log, then the select: no log(0)); else the sum is ≥ 1
    tl.store(lp_ptr + offs_k, tl.where(tp > 0, mp + tl.log(tl.maximum(tp, 1e-30)),
                                       float("-inf")), mask=row_ok)
    tl.store(ln_ptr + offs_k, tl.where(tn > 0, mn + tl.log(tl.maximum(tn, 1e-30)),
                                       float("-inf")), mask=row_ok)


# kind -> (LOGITS, WEIGHTS), filled by the loss modules (register_kind)
_KINDS: dict = {}


def register_kind(kind: int, logits, weights):
    _KINDS[kind] = (logits, weights)


_FWD = "metrix_ops::triton_lse_metrix"
_BWD = "metrix_ops::triton_lse_metrix_bwd"


@triton_op(_FWD, host_reads=True)
def _lse_metrix_op(x: torch.Tensor, labels: torch.Tensor, kind: int, consts: list[float],
                   lam: float, anchor_neg: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z, lse⁺, lse⁻) per anchor of the label-sorted batch."""
    x = x.contiguous()
    b, d = x.shape
    lp, ln = (torch.full((b,), -math.inf, dtype=x.dtype, device=x.device) for _ in range(2))
    if b > 0:
        table, counts, n_chunks, meta, _ = chunk_launch(x, labels, anchor_neg)
        lse_mix_fwd_kernel[(n_chunks,)](
            x, labels, counts, table, loss_constants(x, lam, *consts), lp, ln, b, d,
            x.stride(0), LOGITS=_KINDS[kind][0], **meta)
    # an empty side adds 0 (its lse stays −inf): a loss that drops a side (e.g. λ = 0, no
    # positive label mass) switches its exponents off in LOGITS, and z is the other side
    return torch.where(lp > -math.inf, lp, 0) + torch.where(ln > -math.inf, ln, 0), lp, ln


@_lse_metrix_op.register_fake
def _(x, labels, kind, consts, lam, anchor_neg):
    return tuple(x.new_empty(x.shape[0]) for _ in range(3))


@triton_op(_BWD, host_reads=True)
def _lse_metrix_bwd_op(g_z: torch.Tensor, x: torch.Tensor, labels: torch.Tensor,
                       lse_pos: torch.Tensor, lse_neg: torch.Tensor, kind: int,
                       consts: list[float], lam: float, anchor_neg: bool) -> torch.Tensor:
    x = x.contiguous()
    return mix_grads(_KINDS[kind][1], x, labels, loss_constants(x, lam, *consts),
                     (g_z, lse_pos, lse_neg), anchor_neg)


@_lse_metrix_bwd_op.register_fake
def _(g_z, x, labels, lse_pos, lse_neg, kind, consts, lam, anchor_neg):
    return torch.empty_like(x)


register_lse_autograd(_FWD, torch.ops.metrix_ops.triton_lse_metrix_bwd, 6)


def lse_metrix_rows(kind: int, consts, x_unit, labels, lam: float, pairs: str):
    """(z differentiable, lse⁺, lse⁻), each (B,) in the caller's order, of a
    registered kind."""
    return run_sorted(torch.ops.metrix_ops.triton_lse_metrix, x_unit, labels, pairs, int(kind),
                      [float(c) for c in consts], float(lam))
