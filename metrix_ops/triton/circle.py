"""CircleLoss on the Triton engine (backend="triton"): per anchor of unit rows X against unit
references R, PML's pair-label form (common/circle.h)

    softplus(lse_P(−γ[O_p − s]₊(s − Δ_p)) + lse_N(γ[s − O_n]₊(s − Δ_n))),

O_p = 1 + m, O_n = −m, Δ_p = 1 − m, Δ_n = m, the weights [·]₊ detached (the paper, PML).
Through the two-side log-sum-exp kernels of side_lse.py: the forward keeps per row and side
an online log-sum-exp (empty sides stay −inf, and an anchor lacking a side gives
softplus(−inf) = 0); the backward's G tile is c_i · e^{logit − lse_side} · ∂logit/∂s with c_i = g_i ·
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
from .pairs import is_symmetric, max_dim
from .side_lse import register_kind, side_grad, side_lse_rows


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
def _circle_grad_tile(s, pos, neg, c, lse_p, lse_n, prm_ptr):
    """G = ∂L/∂S of a tile from the rows' upstream gradients c of z = lse_P + lse_N and their
    log-sum-exps (pairs.py's GRAD_TILE)."""
    lp, ln, dp, dn = _circle_logits(s, pos, neg, prm_ptr)
    return side_grad(lp, ln, dp, dn, pos, neg, c, lse_p, lse_n)


CIRCLE = 0
register_kind(CIRCLE, _circle_logits, _circle_grad_tile, empty_zero=False)


def circle_rows_triton(x_unit, r_unit, labels, ref_labels, exclude_diag: bool, m: float,
                       gamma: float) -> torch.Tensor:
    """Per-anchor Circle terms softplus(lse_P + lse_N) (0 for an anchor lacking a side) of
    unit rows against unit references, differentiable in both; the batch against itself
    (r_unit *is* x_unit) takes the symmetric gradient kernel."""
    # γ, O_p, O_n, Δ_p, Δ_n from Python floats, as PML (and common/circle.h) computes them
    z, _, _ = side_lse_rows(CIRCLE, (gamma, 1 + m, -m, 1 - m, m), x_unit, r_unit, labels,
                            ref_labels, exclude_diag,
                            is_symmetric(x_unit, r_unit, labels, ref_labels, exclude_diag))
    return torch.nn.functional.softplus(z, beta=1, threshold=20)


def supports(params, inp, expansion) -> bool:
    x = inp.embeddings
    return (expansion is None and inp.indices_tuple is None and inp.labels is not None
            and is_cosine(inp.distance) and x.shape[1] <= max_dim(x.dtype)
            and usable_on(x.device, x.dtype))


def impl(params, inp, reducer):
    def compute(_n_pos):
        xu, ru = unit_pair(inp)
        rows = circle_rows_triton(xu, ru, inp.labels, inp.ref_labels, inp.same_set,
                                  params["m"], params["gamma"])
        return reduce_rows(rows, reducer, inp.embeddings)

    # PML: zero unless some pair list has two entries; an anchor lacking a side gives 0
    return guarded(compute, inp, need_both=False)


fused.register("triton", "CircleLoss", supports, impl)
