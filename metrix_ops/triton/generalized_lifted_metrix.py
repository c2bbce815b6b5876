"""GeneralizedLiftedStructureLoss with embedding-level Metrix (pairs "pos_neg" or
"anchor_neg") on the Triton engine: per anchor of a batch against itself, the log-sum-exps of
its mixed candidates' lifted exponents (common/lifted_metrix.h: L2 d̃ − m⁺ and m⁻ − d̃ with
d̃ = √(2 − 2s̃), 0 for a candidate within 16 eps of coinciding, zero slope there; cosine
m⁺ − s̃ and s̃ − m⁻) over the closed-form candidates of metrix_tiles.py, by the shared
kernels of lse_metrix.py; the CPU glue's finish_lifted_mixed turns them into L̃ ([log λ + lse⁺
+ log(1 − λ) + lse⁻]₊, a side without label mass left out, the mean over anchors with a
candidate). The clean term is the clean Triton op's (generalized_lifted.py).

A side without label mass (λ = 0: no positive weight; λ = 1: no negative weight) is switched
off in the kernel (its exponents −inf), so the op's z is the other side alone, as the
reference's empty-side rule gives."""

import torch
import triton
import triton.language as tl

from .. import fused
from ..distances import is_cosine, is_normalized_l2
from ..ops.lifted_metrix import finish_lifted_mixed
from ..ops.unit_rows import unit_rows
from .generalized_lifted import impl as clean_impl, supports as clean_supports
from .lse_metrix import lse_metrix_rows, lse_mix_weights, register_kind
from .metrix_tiles import covers

@triton.jit
def _lifted_mix_logits(v, ok, prm_ptr, COSINE: tl.constexpr):
    """The candidates' exponents (−inf off the candidates and on a switched-off side) and
    their slopes ∂/∂s̃; constants after λ: m⁺, m⁻, the coincidence bound, side switches."""
    pm, nm = tl.load(prm_ptr + 1), tl.load(prm_ptr + 2)
    if COSINE:
        xp = pm - v
        xn = v - nm
        k = tl.full(v.shape, 1.0, v.dtype)
    else:
        q = tl.maximum(2.0 - 2.0 * v, 0.0)
        far = q >= tl.load(prm_ptr + 3)  # else coincident: d̃ = 0, no slope
        d = tl.where(far, tl.sqrt(q), 0.0)
        k = tl.where(far, 1.0 / tl.where(far, d, 1.0), 0.0)
        xp = d - pm
        xn = nm - d
    xp = tl.where(ok, xp, float("-inf"))
    xn = tl.where(ok, xn, float("-inf"))
    xp = tl.where(tl.load(prm_ptr + 4) != 0, xp, float("-inf"))
    xn = tl.where(tl.load(prm_ptr + 5) != 0, xn, float("-inf"))
    return xp, xn, -k, k

@triton.jit
def _lifted_mix_logits_cos(v, ok, prm_ptr):
    return _lifted_mix_logits(v, ok, prm_ptr, True)

@triton.jit
def _lifted_mix_logits_l2(v, ok, prm_ptr):
    return _lifted_mix_logits(v, ok, prm_ptr, False)

@triton.jit
def _lifted_mix_weights_cos(v, ok, g, lp, ln, prm_ptr):
    xp, xn, dp, dn = _lifted_mix_logits(v, ok, prm_ptr, True)
    return lse_mix_weights(xp, xn, dp, dn, ok, g, lp, ln)

@triton.jit
def _lifted_mix_weights_l2(v, ok, g, lp, ln, prm_ptr):
    xp, xn, dp, dn = _lifted_mix_logits(v, ok, prm_ptr, False)
    return lse_mix_weights(xp, xn, dp, dn, ok, g, lp, ln)

LIFTED_MIX_COS, LIFTED_MIX_L2 = 1, 2
register_kind(LIFTED_MIX_COS, _lifted_mix_logits_cos, _lifted_mix_weights_cos)
register_kind(LIFTED_MIX_L2, _lifted_mix_logits_l2, _lifted_mix_weights_l2)

def lifted_metrix_lses_triton(x_unit, labels, cosine: bool, pos_margin: float,
                              neg_margin: float, lam: float, pairs: str = "pos_neg"):
    """(z differentiable: the sum of the sides with label mass, has-a-candidate mask), each
    (B,) in the caller's order."""
    consts = (pos_margin, neg_margin, 16 * torch.finfo(x_unit.dtype).eps,
              float(lam > 0.0), float(lam < 1.0))
    z, lp, ln = lse_metrix_rows(LIFTED_MIX_COS if cosine else LIFTED_MIX_L2, consts, x_unit,
                                labels, lam, pairs)
    return z, torch.isfinite(lp) | torch.isfinite(ln)

def metrix_supports(params, inp, expansion, metrix) -> bool:
    """The clean op's calls with the distances the reference mixes in (normalised L2 or the
    plain cosine: the mixes are L2-normalised rows)."""
    d = inp.distance
    return ((is_normalized_l2(d) or is_cosine(d))
            and covers(clean_supports, params, inp, expansion, metrix))

def metrix_impl(params, inp, reducer, metrix, lam: float):
    """L(clean) + weight · L̃."""
    x = inp.embeddings
    z, has = lifted_metrix_lses_triton(unit_rows(x), inp.labels,
                                       is_cosine(inp.distance), params["pos_margin"],
                                       params["neg_margin"], lam, metrix.pairs)
    mixed = finish_lifted_mixed(has, z, lam, x)
    return clean_impl(params, inp, reducer) + metrix.weight * mixed

fused.register_metrix("triton", "GeneralizedLiftedStructureLoss", metrix_supports, metrix_impl)
