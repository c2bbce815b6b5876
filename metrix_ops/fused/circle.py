"""CircleLoss through the fused streaming op: per-anchor terms from circle_fwd (no B×M
matrix), then any reducer, as the reference. Covers CosineSimilarity (the only distance PML
accepts; others raise in the reference) with no indices_tuple."""
from __future__ import annotations

import torch

from ..ops.circle import circle_rows, circle_rows_self
from ..ops.circle_metrix import circle_clean_rows, circle_metrix_terms, finish_circle_mixed
from ..reducers import zero_loss
from ..ops.unit_rows import unit_rows
from . import register, register_metrix
from .multi_similarity import _self_pairs_only as self_pairs_only
from .multi_similarity import metrix_refs_args, self_block
from .ntxent import guarded, reduce_rows, supports, unit_pair


SELF_BLOCK = 1024  # rows per block of the batch against itself (tests set it small)


def impl(params, inp, reducer, chunk=None):
    def compute(_n_pos):
        m, gamma = params["m"], params["gamma"]
        if self_pairs_only(inp, "circle_self_fwd"):  # S symmetric: fewer products
            rows = circle_rows_self(unit_rows(inp.embeddings), inp.labels, m, gamma,
                                    self_block(inp, SELF_BLOCK))
        else:
            xu, ru = unit_pair(inp)
            rows = circle_rows(xu, ru, inp.labels, inp.ref_labels, inp.same_set, m, gamma,
                               chunk)
        return reduce_rows(rows, reducer, inp.embeddings)

    # PML: zero unless some pair list has two entries; an anchor lacking a side gives 0
    return guarded(compute, inp, need_both=False)


def metrix_supports(params, inp, expansion, metrix) -> bool:
    """The fused Metrix ops: embedding level, pos_neg or anchor_neg pairs, the batch against
    itself or against references, CPU tensors."""
    return (supports(params, inp, expansion) and metrix.level == "embedding"
            and metrix.pairs in ("pos_neg", "anchor_neg")
            and inp.embeddings.device.type == "cpu")


def metrix_impl(params, inp, reducer, metrix, lam: float, block: int = 1024):
    """L(clean) + weight · L̃, the mixed term AvgNonZero over anchors (the reference's
    circle_soft), both from one op's pass over S: the batch against itself (its symmetric
    blocks, circle_metrix_self_fwd) or references (circle_metrix_refs_fwd). The clean terms
    ride on the products the candidates need, which at D = 512 are most of the clean op's
    time; their per-pair exponentials are the clean op's own work, moved."""
    x = inp.embeddings
    xu = unit_rows(x)
    m, gamma = params["m"], params["gamma"]
    lp, ln, clp, cln = circle_metrix_terms(xu, inp.labels, m, gamma, lam, metrix.pairs, block,
                                           metrix_refs_args(inp, xu), clean=True)
    clean = guarded(lambda _n: reduce_rows(circle_clean_rows(clp, cln), reducer, x), inp,
                    need_both=False)
    if not 0.0 < lam < 1.0:  # one side has no label mass: every ℓ̃(a) is 0
        return clean + metrix.weight * zero_loss(x)
    return clean + metrix.weight * finish_circle_mixed(torch.isfinite(lp), lp + ln, lam, x)


register("cpu", "CircleLoss", supports, impl)
register_metrix("cpu", "CircleLoss", metrix_supports, metrix_impl)
