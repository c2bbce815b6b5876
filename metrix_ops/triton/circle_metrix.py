"""CircleLoss with embedding-level Metrix (pairs "pos_neg" or "anchor_neg") on the Triton
engine: per anchor of a batch against itself, the log-sum-exps lse⁺ and lse⁻ of its mixed
candidates' Circle logits (common/circle_metrix.h: −γ[O_p − s̃]₊(s̃ − Δ_p) and
γ[s̃ − O_n]₊(s̃ − Δ_n), the weights detached) over the closed-form candidates of
metrix_tiles.py, by the shared kernels of lse_metrix.py; the op returns z = lse⁺ + lse⁻, and
the CPU glue's finish_circle_mixed turns it into L̃ (softplus(log λ + log(1 − λ) + z),
AvgNonZero over anchors). The clean term is the clean Triton op's (circle.py)."""
import torch
import triton
import triton.language as tl  # noqa: F401 (must be visible to the jit functions here)

from .. import fused
from ..ops.circle_metrix import finish_circle_mixed
from ..reducers import zero_loss
from ..ops.unit_rows import unit_rows
from .circle import _circle_logits, impl as clean_impl, supports as clean_supports
from .lse_metrix import lse_metrix_rows, lse_mix_weights, register_kind
from .metrix_tiles import covers


@triton.jit
def _circle_mix_logits(v, ok, prm_ptr):
    """The candidates' two logits (−inf off the candidates) and their slopes ∂/∂s̃: the clean
    tile's (circle.py) over the KB×KB×N candidates, its constants after λ."""
    return _circle_logits(v, ok, ok, prm_ptr + 1)


@triton.jit
def _circle_mix_weights(v, ok, g, lp, ln, prm_ptr):
    """w = ∂L/∂s̃ per candidate (metrix_tiles' WEIGHTS), g the anchors' gradient of z."""
    xp, xn, dp, dn = _circle_mix_logits(v, ok, prm_ptr)
    return lse_mix_weights(xp, xn, dp, dn, ok, g, lp, ln)


CIRCLE_MIX = 0
register_kind(CIRCLE_MIX, _circle_mix_logits, _circle_mix_weights)


def circle_metrix_lses_triton(x_unit, labels, m: float, gamma: float, lam: float,
                              pairs: str = "pos_neg"):
    """(z = lse⁺ + lse⁻ differentiable, has-a-candidate mask), each (B,) in the caller's
    order."""
    # γ, O_p, O_n, Δ_p, Δ_n from Python floats (common/circle.h)
    out = lse_metrix_rows(CIRCLE_MIX, (gamma, 1 + m, -m, 1 - m, m), x_unit, labels, lam, pairs)
    return out[0], torch.isfinite(out[1])


def metrix_supports(params, inp, expansion, metrix) -> bool:
    return covers(clean_supports, params, inp, expansion, metrix)


def metrix_impl(params, inp, reducer, metrix, lam: float):
    """L(clean) + weight · L̃ (L̃ 0 at λ ∈ {0, 1}: a side without label mass)."""
    x = inp.embeddings
    if 0.0 < lam < 1.0:
        z, has = circle_metrix_lses_triton(unit_rows(x), inp.labels, params["m"],
                                           params["gamma"], lam, metrix.pairs)
        mixed = finish_circle_mixed(has, z, lam, x)
    else:
        mixed = zero_loss(x)
    return clean_impl(params, inp, reducer) + metrix.weight * mixed


fused.register_metrix("triton", "CircleLoss", metrix_supports, metrix_impl)

