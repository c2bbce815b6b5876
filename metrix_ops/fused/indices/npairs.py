"""NPairsLoss over an indices_tuple: PML keeps the tuple's first positive pair per anchor label
(reference.npairs.unique_label_pos_pairs, O(P)); the K kept anchors' cross-entropies over
the K kept positives then run on the fused ProxyNCA op as fused/npairs.py does for the
clean loss (K ≤ the number of labels; the K×K logits are streamed, never stored)."""
from __future__ import annotations

import torch

from ... import _ext
from ...distances import CosineSimilarity, DotProductSimilarity
from ...ops.proxy_nca import COSINE, proxy_nca_rows
from ...reducers import reduce_loss_dict
from ...reference.npairs import npairs_loss_dict, unique_label_pos_pairs
from .. import register_indices
from .common import ZERO


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
    if len(a) == 0:
        return reduce_loss_dict({"loss": dict(ZERO)}, reducer, x)
    xk = inp.distance.maybe_normalize(x)  # as the reference: its p, or none
    rows = proxy_nca_rows(xk.index_select(0, a), xk.index_select(0, p),
                          torch.arange(len(a), device=x.device), 1.0, COSINE)
    return reduce_loss_dict({"loss": {"losses": rows, "indices": a, "reduction_type": "element"}},
                            reducer, x)


register_indices("cpu", "NPairsLoss", supports, impl)
