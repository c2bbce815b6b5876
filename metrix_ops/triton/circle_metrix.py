"""CircleLoss with embedding-level Metrix (pairs "pos_neg" or "anchor_neg") on the Triton
engine: per anchor of a batch against itself, the log-sum-exps lse⁺ and lse⁻ of its mixed
candidates' Circle logits (common/circle_metrix.h: −γ[O_p − s̃]₊(s̃ − Δ_p) and
γ[s̃ − O_n]₊(s̃ − Δ_n), the weights detached) over the closed-form candidates of
metrix_tiles.py; the op returns z = lse⁺ + lse⁻, and the CPU glue's finish_circle_mixed
turns it into L̃ (softplus(log λ + log(1 − λ) + z), AvgNonZero over anchors). The clean
term is the clean Triton op's (circle.py).

Online log-sum-exps from −inf (an anchor without a candidate keeps −inf on both sides);
the backward's candidate weight is g_a (e^{x⁺ − lse⁺} ∂x⁺/∂s̃ + e^{x⁻ − lse⁻} ∂x⁻/∂s̃) through
metrix_tiles' shared gradient kernels."""
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .. import fused
from ..ops.circle_metrix import finish_circle_mixed
from ..reducers import zero_loss
from .circle import _circle_logits, impl as clean_impl, supports as clean_supports
from .metrix_tiles import (candidate_tile, chunk_rows, covers, fold3, mix_config, mix_grads,
                           register_lse_autograd, run_sorted)
from .pairs import loss_constants


@triton.jit
def _circle_mix_logits(v, ok, prm_ptr):
    """The candidates' two logits (−inf off the candidates) and their slopes ∂/∂s̃: the clean
    tile's (circle.py) over the KB×KB×N candidates, its constants after λ."""
    return _circle_logits(v, ok, ok, prm_ptr + 1)


@triton.jit
def _circle_mix_weights(v, ok, g, lp, ln, prm_ptr):
    """w = ∂L/∂s̃ per candidate (metrix_tiles' WEIGHTS), g the anchors' gradient of z."""
    xp, xn, dp, dn = _circle_mix_logits(v, ok, prm_ptr)
    lp0 = tl.where(lp == float("-inf"), 0.0, lp)  # no candidate: every term is masked
    ln0 = tl.where(ln == float("-inf"), 0.0, ln)
    w = tl.exp(xp - lp0[:, None, None]) * dp + tl.exp(xn - ln0[:, None, None]) * dn
    return tl.where(ok, g[:, None, None] * w, 0.0)


@triton.jit
def _circle_mix_fwd_kernel(x_ptr, lab_ptr, cnt_ptr, chunk_ptr, prm_ptr, lp_ptr, ln_ptr, B, D,
                           stride_x, ANCHOR_NEG: tl.constexpr, KB: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
                           PRECISION: tl.constexpr):
    offs_k, c1, lab_k, pm, sap = chunk_rows(chunk_ptr, tl.program_id(0), lab_ptr, cnt_ptr, x_ptr,
                                            D, stride_x, ANCHOR_NEG, KB, BLOCK_D, ACC, PRECISION)
    lam = tl.load(prm_ptr)
    mp = tl.full((KB,), float("-inf"), ACC)
    mn = tl.full((KB,), float("-inf"), ACC)
    tp = tl.zeros((KB,), ACC)
    tn = tl.zeros((KB,), ACC)
    for n0 in range(0, B, BLOCK_N):
        v, ok, r, offs_n = candidate_tile(x_ptr, lab_ptr, offs_k, c1, lab_k, pm, sap, n0, B, D,
                                          stride_x, lam, KB, BLOCK_N, BLOCK_D, ACC, PRECISION)
        xp, xn, _, _ = _circle_mix_logits(v, ok, prm_ptr)
        mp, tp = fold3(mp, tp, xp)
        mn, tn = fold3(mn, tn, xn)
    row_ok = offs_k < c1
    # no candidate: −inf (a clamped log, then the select: no log(0)); else the sum is ≥ 1
    tl.store(lp_ptr + offs_k, tl.where(tp > 0, mp + tl.log(tl.maximum(tp, 1e-30)),
                                       float("-inf")), mask=row_ok)
    tl.store(ln_ptr + offs_k, tl.where(tn > 0, mn + tl.log(tl.maximum(tn, 1e-30)),
                                       float("-inf")), mask=row_ok)


def _constants(x, m, gamma, lam):
    # λ first (metrix_tiles), then γ, O_p, O_n, Δ_p, Δ_n from Python floats (common/circle.h)
    return loss_constants(x, lam, gamma, 1 + m, -m, 1 - m, m)


_FWD = "metrix_ops::triton_circle_metrix"
_BWD = "metrix_ops::triton_circle_metrix_bwd"


@torch.library.custom_op(_FWD, mutates_args=())
def _circle_metrix_op(x: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor,
                      chunks: torch.Tensor, kb: int, m: float, gamma: float, lam: float,
                      anchor_neg: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z = lse⁺ + lse⁻, lse⁺, lse⁻) per anchor of the label-sorted batch."""
    x = x.contiguous()
    b, d = x.shape
    lp, ln = (torch.full((b,), -math.inf, dtype=x.dtype, device=x.device) for _ in range(2))
    if b > 0:
        cfg, _, warps = mix_config(x, kb)
        _circle_mix_fwd_kernel[(len(chunks) - 1,)](
            x, labels, counts, chunks, _constants(x, m, gamma, lam), lp, ln, b, d, x.stride(0),
            ANCHOR_NEG=bool(anchor_neg), KB=kb, **cfg, **warps)
    return lp + ln, lp, ln


@_circle_metrix_op.register_fake
def _(x, labels, counts, chunks, kb, m, gamma, lam, anchor_neg):
    return tuple(x.new_empty(x.shape[0]) for _ in range(3))


@torch.library.custom_op(_BWD, mutates_args=())
def _circle_metrix_bwd_op(g_z: torch.Tensor, x: torch.Tensor, labels: torch.Tensor,
                          counts: torch.Tensor, chunks: torch.Tensor, lse_pos: torch.Tensor,
                          lse_neg: torch.Tensor, kb: int, m: float, gamma: float, lam: float,
                          anchor_neg: bool) -> torch.Tensor:
    x = x.contiguous()
    return mix_grads(_circle_mix_weights, x, labels, counts, chunks, kb,
                     _constants(x, m, gamma, lam), (g_z, lse_pos, lse_neg), anchor_neg)


@_circle_metrix_bwd_op.register_fake
def _(g_z, x, labels, counts, chunks, lse_pos, lse_neg, kb, m, gamma, lam, anchor_neg):
    return torch.empty_like(x)


register_lse_autograd(_FWD, torch.ops.metrix_ops.triton_circle_metrix_bwd, 9)


def circle_metrix_lses_triton(x_unit, labels, m: float, gamma: float, lam: float,
                              pairs: str = "pos_neg"):
    """(z = lse⁺ + lse⁻ differentiable, has-a-candidate mask), each (B,) in the caller's
    order. None when a class has more than MAX_CLASS rows (not covered)."""
    out = run_sorted(torch.ops.metrix_ops.triton_circle_metrix, x_unit, labels, pairs,
                     float(m), float(gamma), float(lam))
    return None if out is None else (out[0], torch.isfinite(out[1]))


def metrix_supports(params, inp, expansion, metrix) -> bool:
    return covers(clean_supports, params, inp, expansion, metrix)


def metrix_impl(params, inp, reducer, metrix, lam: float):
    """L(clean) + weight · L̃ (L̃ 0 at λ ∈ {0, 1}: a side without label mass)."""
    x = inp.embeddings
    if 0.0 < lam < 1.0:
        z, has = circle_metrix_lses_triton(F.normalize(x, dim=1), inp.labels, params["m"],
                                           params["gamma"], lam, metrix.pairs)
        mixed = finish_circle_mixed(has, z, lam, x)
    else:
        mixed = zero_loss(x)
    return clean_impl(params, inp, reducer) + metrix.weight * mixed


fused.register_metrix("triton", "CircleLoss", metrix_supports, metrix_impl)

