"""MultiSimilarityLoss with embedding-level Metrix (pairs "pos_neg" or "anchor_neg") on the
Triton engine: the mixed term ℓ̃(a) of every anchor of a batch against itself,

    ℓ̃(a) = (1/α) log(1 + λ Σ_V e^{−α(s̃−base)}) + (1/β) log(1 + (1−λ) Σ_V e^{β(s̃−base)}),

over the closed-form candidates V(a) of metrix_tiles.py (no mixed point materialised, no
B×B or B×B×B tensor). The clean MS term is the clean Triton op's (multi_similarity.py).

- forward (one program per chunk of whole classes): streams column tiles, and per anchor and
  side keeps an online log-sum-exp started from the term 1/y (y = λ or 1−λ, the side's label
  weight), so that it ends as log(1/y + Σ e^·), the normaliser the gradient divides by, and
  ℓ̃'s side is (that + log y)/k. A side with y = 0 contributes nothing (flag 0).
- backward: w = ∂ℓ̃/∂s̃ = g_a (e^{β(s̃−base) − lse⁻_a} − e^{−α(s̃−base) − lse⁺_a}) per
  candidate, through the chain rule of the mix into a ∂L/∂S tile on the chunk's rows. Its
  product with the column rows goes to the chunk's own dX rows (row programs, which also add
  the within-class entries); its transpose times the chunk's rows goes to the columns' dX,
  which column programs own (a second kernel recomputing the candidates): no atomics,
  deterministic. The candidates are recomputed rather than stored: there are (K−1)·B per
  anchor (K per class), more than the B×B matrix this engine exists not to hold."""
import math

import torch
import triton
import triton.language as tl

from .. import fused
from ..ops.unit_rows import unit_rows
from .launch import triton_op
from .metrix_tiles import (candidate_tile, chunk_launch, chunk_rows, covers, fold3, mix_grads,
                           pos_block, register_lse_autograd, run_sorted)
from .multi_similarity import ms_rows_triton, supports as clean_supports
from .pairs import loss_constants


@triton.jit
def _ms_mix_args(v, ok, prm_ptr):
    """Each candidate's two exponents, −inf off the candidates."""
    alpha, beta, base = tl.load(prm_ptr + 1), tl.load(prm_ptr + 2), tl.load(prm_ptr + 3)
    xp = tl.where(ok, -alpha * (v - base), float("-inf"))
    xn = tl.where(ok, beta * (v - base), float("-inf"))
    return xp, xn


@triton.jit
def _ms_mix_weights(v, ok, g, lp, ln, prm_ptr):
    """w = ∂L/∂s̃ per candidate from the anchors' upstream gradients and log normalisers
    (metrix_tiles' WEIGHTS); every exponent is ≤ ~0 (each normaliser includes its terms)."""
    xp, xn = _ms_mix_args(v, ok, prm_ptr)
    fp, fn = tl.load(prm_ptr + 8), tl.load(prm_ptr + 9)
    w = fn * tl.exp(xn - ln[:, None, None]) - fp * tl.exp(xp - lp[:, None, None])
    return tl.where(ok, g[:, None, None] * w, 0.0)


@triton.jit
def _ms_mix_fwd_kernel(x_ptr, lab_ptr, cnt_ptr, chunk_ptr, prm_ptr, mix_ptr, lp_ptr, ln_ptr,
                       B, D, stride_x, ANCHOR_NEG: tl.constexpr, SPLIT: tl.constexpr,
                       KB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       ACC: tl.constexpr, PRECISION: tl.constexpr):
    offs_k, a1, lab_k, cnt_k, p0, p1 = chunk_rows(chunk_ptr, tl.program_id(0), lab_ptr, cnt_ptr,
                                                  KB)
    lam = tl.load(prm_ptr)
    mp = tl.zeros((KB,), dtype=ACC) + tl.load(prm_ptr + 4)
    mn = tl.zeros((KB,), dtype=ACC) + tl.load(prm_ptr + 5)
    sp = tl.full((KB,), 1.0, dtype=ACC)
    sn = tl.full((KB,), 1.0, dtype=ACC)
    for p in range(p0, p1, KB):
        offs_p, lab_p, pm, sap = pos_block(x_ptr, lab_ptr, offs_k, a1, lab_k, cnt_k, p, p1, D,
                                       stride_x, ANCHOR_NEG, KB, BLOCK_D, ACC, PRECISION)
        for n0 in range(0, B, BLOCK_N):
            v, ok, r, offs_n, s_a, s_p, lab_n = candidate_tile(
                x_ptr, lab_ptr, offs_k, a1, lab_k, offs_p, p1, pm, sap, n0, B, D, stride_x, lam,
                SPLIT, KB, BLOCK_N, BLOCK_D, ACC, PRECISION)
            xp, xn = _ms_mix_args(v, ok, prm_ptr)
            mp, sp = fold3(mp, sp, xp)
            mn, sn = fold3(mn, sn, xn)
    lp = mp + tl.log(sp)
    ln = mn + tl.log(sn)
    alpha, beta = tl.load(prm_ptr + 1), tl.load(prm_ptr + 2)
    lyp, lyn = tl.load(prm_ptr + 6), tl.load(prm_ptr + 7)
    fp, fn = tl.load(prm_ptr + 8), tl.load(prm_ptr + 9)
    mix = fp * (lp + lyp) / alpha + fn * (ln + lyn) / beta
    row_ok = offs_k < a1
    tl.store(mix_ptr + offs_k, mix, mask=row_ok)
    tl.store(lp_ptr + offs_k, lp, mask=row_ok)
    tl.store(ln_ptr + offs_k, ln, mask=row_ok)


def _constants(x, alpha, beta, base, lam):
    """The constants tensor: λ (first, as metrix_tiles wants), α, β, base, then per side (+, −)
    the start of the online log-sum-exp (−log y, or 0 for y = 0), log y (0 for y = 0) and
    the side's flag (y > 0)."""
    def side(y):  # (start of the online lse, log y, flag)
        return (-math.log(y), math.log(y), 1.0) if y > 0 else (0.0, 0.0, 0.0)
    (m0p, lyp, fp), (m0n, lyn, fn) = side(lam), side(1.0 - lam)
    return loss_constants(x, lam, alpha, beta, base, m0p, m0n, lyp, lyn, fp, fn)


_FWD = "metrix_ops::triton_ms_metrix"
_BWD = "metrix_ops::triton_ms_metrix_bwd"


@triton_op(_FWD, host_reads=True)
def _ms_metrix_op(x: torch.Tensor, labels: torch.Tensor, alpha: float, beta: float,
                  base: float, lam: float, anchor_neg: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = x.contiguous()
    b, d = x.shape
    mix, lp, ln = (torch.zeros(b, dtype=x.dtype, device=x.device) for _ in range(3))
    if b == 0:
        return mix, lp, ln
    table, counts, n_chunks, meta, _ = chunk_launch(x, labels, anchor_neg)
    _ms_mix_fwd_kernel[(n_chunks,)](
        x, labels, counts, table, _constants(x, alpha, beta, base, lam), mix, lp, ln, b, d,
        x.stride(0), **meta)
    return mix, lp, ln


@_ms_metrix_op.register_fake
def _(x, labels, alpha, beta, base, lam, anchor_neg):
    return tuple(x.new_empty(x.shape[0]) for _ in range(3))


@triton_op(_BWD, host_reads=True)
def _ms_metrix_bwd_op(g: torch.Tensor, x: torch.Tensor, labels: torch.Tensor,
                      lse_pos: torch.Tensor, lse_neg: torch.Tensor, alpha: float, beta: float,
                      base: float, lam: float, anchor_neg: bool) -> torch.Tensor:
    x = x.contiguous()
    return mix_grads(_ms_mix_weights, x, labels,
                     _constants(x, alpha, beta, base, lam), (g, lse_pos, lse_neg), anchor_neg)


@_ms_metrix_bwd_op.register_fake
def _(g, x, labels, lse_pos, lse_neg, alpha, beta, base, lam, anchor_neg):
    return torch.empty_like(x)


register_lse_autograd(_FWD, torch.ops.metrix_ops.triton_ms_metrix_bwd, 7)


def ms_metrix_rows_triton(x_unit, labels, alpha: float, beta: float, base: float, lam: float,
                          pairs: str = "pos_neg"):
    """ℓ̃(a) for each anchor (B,), in the caller's order, of unit rows x_unit against
    themselves (0 where V(a) is empty); differentiable in x_unit."""
    return run_sorted(torch.ops.metrix_ops.triton_ms_metrix, x_unit, labels, pairs,
                      float(alpha), float(beta), float(base), float(lam))[0]


def metrix_supports(params, inp, expansion, metrix) -> bool:
    return covers(clean_supports, params, inp, expansion, metrix)


def metrix_impl(params, inp, reducer, metrix, lam: float):
    """L(clean) + weight · L̃, L̃ the mean of ℓ̃(a) over the anchors with a candidate (as the
    CPU op's glue: with one class every ℓ̃(a) is 0, so the sum over B is that mean)."""
    from ..fused.multi_similarity import _reduce_clean
    x = inp.embeddings
    xu = unit_rows(x)
    a, b, base = params["alpha"], params["beta"], params["base"]
    rows = ms_rows_triton(xu, xu, inp.labels, inp.labels, True, a, b, base)
    mix = ms_metrix_rows_triton(xu, inp.labels, a, b, base, lam, metrix.pairs)
    return _reduce_clean(rows, inp, reducer) + metrix.weight * (mix.sum() / max(len(mix), 1))


fused.register_metrix("triton", "MultiSimilarityLoss", metrix_supports, metrix_impl)
