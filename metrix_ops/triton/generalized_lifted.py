"""GeneralizedLiftedStructureLoss on the Triton engine (backend="triton"): per anchor
[lse⁺ + lse⁻]₊ of PML's margin terms (common/lifted.h), a side with no pair adding 0 (PML's
masked log-sum-exp), through the two-side log-sum-exp kernels of side_lse.py.

Exponents from s = ⟨x_i, r_j⟩ of unit rows:
  L2 (normalised LpDistance): d = √(2 − 2s) (0 below 8 ulps: duplicates give d = 0),
      positive d − m⁺, negative m⁻ − d, slopes ∓1/d (0 at d = 0, as torch.cdist's backward);
  cosine (PML's margin(x, y) = y − x): positive m⁺ − s, negative s − m⁻, slopes ∓1.
The L2 of rows of any norm takes the kernels' RAW form (s read as 1 − d²/2 from the rows'
norms, tiles.raw_unit_sims).
The hinge's gradient (torch's relu'(0) = 0) is applied in torch to z before the kernels
see it. Reduction and the no-pairs rule are the CPU glue's (fused/generalized_lifted.py)."""
import torch
import triton
import triton.language as tl

from .. import fused
from ..distances import is_dot_of_normalized, is_normalized_l2, is_raw_l2
from ..fused.generalized_lifted import _reduce_clean
from ..fused.raw_l2 import raw_at
from ..ops.unit_rows import normalized
from .launch import usable_on
from .pairs import is_symmetric, max_dim
from .side_lse import register_kind, side_grad, side_lse_rows


@triton.jit
def _lifted_logits(s, pos, neg, prm_ptr, COSINE: tl.constexpr):
    pm, nm = tl.load(prm_ptr), tl.load(prm_ptr + 1)
    if COSINE:
        lp = tl.where(pos, pm - s, float("-inf"))
        ln = tl.where(neg, s - nm, float("-inf"))
        k = tl.full(s.shape, 1.0, s.dtype)
    else:
        q = 2.0 - 2.0 * s
        d = tl.where(q > tl.load(prm_ptr + 2), tl.sqrt(tl.maximum(q, 0.0)), 0.0)
        lp = tl.where(pos, d - pm, float("-inf"))
        ln = tl.where(neg, nm - d, float("-inf"))
        k = tl.where(d > 0.0, 1.0 / tl.where(d > 0.0, d, 1.0), 0.0)
    return lp, ln, -k, k


@triton.jit
def _lifted_logits_cos(s, pos, neg, prm_ptr):
    return _lifted_logits(s, pos, neg, prm_ptr, True)


@triton.jit
def _lifted_logits_l2(s, pos, neg, prm_ptr):
    return _lifted_logits(s, pos, neg, prm_ptr, False)


@triton.jit
def _lifted_grad_tile_cos(s, pos, neg, c, lse_p, lse_n, prm_ptr):
    lp, ln, dp, dn = _lifted_logits(s, pos, neg, prm_ptr, True)
    return side_grad(lp, ln, dp, dn, pos, neg, c, lse_p, lse_n)


@triton.jit
def _lifted_grad_tile_l2(s, pos, neg, c, lse_p, lse_n, prm_ptr):
    lp, ln, dp, dn = _lifted_logits(s, pos, neg, prm_ptr, False)
    return side_grad(lp, ln, dp, dn, pos, neg, c, lse_p, lse_n)


GEN_LIFTED_COS, GEN_LIFTED_L2 = 1, 2
register_kind(GEN_LIFTED_COS, _lifted_logits_cos, _lifted_grad_tile_cos, empty_zero=True)
register_kind(GEN_LIFTED_L2, _lifted_logits_l2, _lifted_grad_tile_l2, empty_zero=True)


def lifted_side_rows(x_unit, r_unit, labels, ref_labels, exclude_diag: bool, cosine: bool,
                     pos_margin: float, neg_margin: float, raw: bool = False):
    """(z, lse⁺, lse⁻) per anchor, z = lse⁺ + lse⁻ with an empty side adding 0 (−inf in its
    lse), differentiable in x_unit and r_unit; the batch against itself (r_unit *is* x_unit)
    takes the symmetric gradient kernel. raw: rows of any norm at their L2 distances."""
    # the last constant: d² below 8 ulps of the dtype is taken as 0 (common/contrastive.h)
    consts = (pos_margin, neg_margin, 8 * torch.finfo(x_unit.dtype).eps)
    return side_lse_rows(GEN_LIFTED_COS if cosine else GEN_LIFTED_L2, consts, x_unit, r_unit,
                         labels, ref_labels, exclude_diag,
                         is_symmetric(x_unit, r_unit, labels, ref_labels, exclude_diag), raw)


def supports(params, inp, expansion) -> bool:
    """Normalised L2, a cosine of rows the distance normalises, and the L2 of raw rows (the
    kernels' RAW form)."""
    d, x = inp.distance, inp.embeddings
    return (expansion is None and inp.indices_tuple is None and inp.labels is not None
            and (is_normalized_l2(d) or is_dot_of_normalized(d) or raw_at(inp, powers=(1,)))
            and x.shape[1] <= max_dim(x.dtype) and usable_on(x.device, x.dtype))


def impl(params, inp, reducer):
    d, x = inp.distance, inp.embeddings
    # the reference's normalisation (its p; raw L2: none): a cosine-type similarity of any
    # rows is exact
    xu = normalized(d, x)
    if inp.ref_emb is x and inp.same_set:
        ru = xu
    else:
        ru = normalized(d, inp.ref_emb)
    z, _, _ = lifted_side_rows(xu, ru, inp.labels, inp.ref_labels, inp.same_set,
                               is_dot_of_normalized(d), params["pos_margin"],
                               params["neg_margin"], is_raw_l2(d))
    return _reduce_clean(torch.relu(z), inp, reducer)


fused.register("triton", "GeneralizedLiftedStructureLoss", supports, impl)
