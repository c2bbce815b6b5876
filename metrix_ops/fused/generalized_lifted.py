"""GeneralizedLiftedStructureLoss through the fused streaming op: per-anchor terms from
gen_lifted_fwd (no B×M matrix), then PML's element reduction with any reducer.

Covers PML's default LpDistance on normalised embeddings (d = sqrt(max(2 − 2s, 0))),
CosineSimilarity and (CPU tensors) the L2 of unnormalised rows (the raw rows, whose norms
the ops read, raw_l2.py); other distances and indices_tuple go to the reference."""
from __future__ import annotations


from .. import _ext
from ..distances import is_cosine, is_dot_of_normalized, is_normalized_l2, is_raw_l2
from ..ops.lifted import gen_lifted_rows, gen_lifted_rows_self
from ..ops.lifted_metrix import finish_lifted_lses, gen_lifted_clean_rows, lifted_metrix_terms
from ..ops.unit_rows import unit_rows, normalized
from . import register, register_metrix
from .raw_l2 import raw_on_cpu
# the batch-against-itself test (S symmetric) and the element reduction are MS's
from .multi_similarity import _reduce_clean
from .multi_similarity import _self_pairs_only as self_pairs_only, self_block
from .multi_similarity import metrix_refs_args


def supports(params, inp, expansion) -> bool:
    d = inp.distance
    return (_ext.HAS_EXT and expansion is None and inp.indices_tuple is None
            and inp.labels is not None and (is_normalized_l2(d) or is_dot_of_normalized(d)
                                            or raw_on_cpu(inp, powers=(1,))))


def impl(params, inp, reducer, chunk: int = 2048, block: int = 1024):
    d, cosine = inp.distance, is_dot_of_normalized(inp.distance)
    pm, nm = params["pos_margin"], params["neg_margin"]
    # the reference's normalisation (its p): a cosine-type similarity of any rows is exact
    xu = normalized(d, inp.embeddings)
    # (raw L2: the raw rows, whose norms the op reads)
    if self_pairs_only(inp, "gen_lifted_self_fwd"):
        rows = gen_lifted_rows_self(xu, inp.labels, cosine, pm, nm, self_block(inp, block),
                                    raw=is_raw_l2(d))
    else:  # (raw L2: the raw rows, the op reads their norms)
        rows = gen_lifted_rows(xu, normalized(d, inp.ref_emb), inp.labels, inp.ref_labels,
                               inp.same_set, cosine, pm, nm, chunk, raw=is_raw_l2(d))
    # PML's no-pairs rule and the element reduction are MS's (one term per anchor)
    return _reduce_clean(rows, inp, reducer)


def metrix_supports(params, inp, expansion, metrix) -> bool:
    """The fused Metrix ops: embedding level, pos_neg or anchor_neg pairs, the batch against
    itself or against references (CPU tensors), L2 or the plain cosine (the reference mixes L2-normalised rows: another p of
    CosineSimilarity would not be the clean loss's similarity of the mixes)."""
    d = inp.distance
    return (supports(params, inp, expansion) and metrix.level == "embedding"
            and metrix.pairs in ("pos_neg", "anchor_neg") and inp.embeddings.device.type == "cpu"
            and (is_normalized_l2(d) or is_cosine(d)))


def metrix_impl(params, inp, reducer, metrix, lam: float, block: int = 1024):
    """L(clean) + weight · L̃, the mixed term the mean over anchors with a candidate (the
    reference's generalized_lifted_soft), both from one op's pass over S (the batch against
    itself or references; see fused/circle.py)."""
    x = inp.embeddings
    xu = unit_rows(x)
    cosine, pm, nm = is_cosine(inp.distance), params["pos_margin"], params["neg_margin"]
    lp, ln, clp, cln = lifted_metrix_terms(xu, inp.labels, cosine, pm, nm, lam, metrix.pairs,
                                           block, metrix_refs_args(inp, xu), clean=True)
    clean = _reduce_clean(gen_lifted_clean_rows(clp, cln), inp, reducer)
    return clean + metrix.weight * finish_lifted_lses(lp, ln, lam, x)


register("cpu", "GeneralizedLiftedStructureLoss", supports, impl)
register_metrix("cpu", "GeneralizedLiftedStructureLoss", metrix_supports, metrix_impl)
