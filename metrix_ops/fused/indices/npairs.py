"""NPairsLoss over an indices_tuple: PML keeps the tuple's first positive pair per anchor label
(reference.npairs.unique_label_pos_pairs, O(P)); the K kept anchors' cross-entropies over
the K kept positives then run on the fused ProxyNCA op as fused/npairs.py does for the
clean loss (K ≤ the number of labels; the K×K logits are streamed, never stored)."""
from __future__ import annotations

from ... import _ext
from ...distances import CosineSimilarity, DotProductSimilarity
from ...reducers import reduce_loss_dict
from ...reference.npairs import npairs_loss_dict, unique_label_pos_pairs
from .. import register_indices
from ..npairs import pairs_loss


def supports(params, inp, expansion) -> bool:
    d = inp.distance
    return (_ext.HAS_EXT and expansion is None and inp.indices_tuple is not None
            and inp.ref_emb is inp.embeddings
            and type(d) in (CosineSimilarity, DotProductSimilarity) and d.power == 1)


def impl(params, inp, reducer):
    x = inp.embeddings
    if inp.labels is None:  # the reference's error: the pairs are chosen by label
        return reduce_loss_dict(npairs_loss_dict(inp, **params), reducer, x)
    a, p = unique_label_pos_pairs(tuple(t.long() for t in inp.indices_tuple), inp.labels)
    return pairs_loss(inp, reducer, a, p)


register_indices("cpu", "NPairsLoss", supports, impl)
