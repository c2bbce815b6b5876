"""GeneralizedLiftedStructureLoss through the fused streaming op: per-anchor terms from
gen_lifted_fwd (no B×M matrix), then PML's element reduction with any reducer.

Covers PML's default LpDistance on normalised embeddings (d = sqrt(max(2 − 2s, 0))) and
CosineSimilarity; other distances, unnormalised embeddings and indices_tuple go to the
reference."""
from __future__ import annotations

from .. import _ext
from ..distances import is_dot_of_normalized, is_normalized_l2
from ..ops.lifted import gen_lifted_rows, gen_lifted_rows_self
from . import register
# the batch-against-itself test (S symmetric) and the element reduction are MS's
from .multi_similarity import _reduce_clean
from .multi_similarity import _self_pairs_only as self_pairs_only


def supports(params, inp, expansion) -> bool:
    d = inp.distance
    return (_ext.HAS_EXT and expansion is None and inp.indices_tuple is None
            and inp.labels is not None and (is_normalized_l2(d) or is_dot_of_normalized(d)))


def impl(params, inp, reducer, chunk: int = 2048, block: int = 1024):
    d, cosine = inp.distance, is_dot_of_normalized(inp.distance)
    pm, nm = params["pos_margin"], params["neg_margin"]
    # the reference's normalisation (its p): a cosine-type similarity of any rows is exact
    xu = d.maybe_normalize(inp.embeddings)
    if self_pairs_only(inp):
        rows = gen_lifted_rows_self(xu, inp.labels, cosine, pm, nm, block)
    else:
        rows = gen_lifted_rows(xu, d.maybe_normalize(inp.ref_emb), inp.labels, inp.ref_labels,
                               inp.same_set, cosine, pm, nm, chunk)
    # PML's no-pairs rule and the element reduction are MS's (one term per anchor)
    return _reduce_clean(rows, inp, reducer)


register("cpu", "GeneralizedLiftedStructureLoss", supports, impl)
