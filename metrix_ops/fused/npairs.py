"""NPairsLoss through the fused ProxyNCA op. PML keeps one positive pair (a, p) per label
(reference/npairs.py), then takes each kept anchor's cross-entropy over its similarities
to all kept positives: the softmax loss of K anchors against K "proxies" x_p, the own
proxy of anchor k being positive k. That is proxy_nca_fwd with labels 0..K−1 and logits s
(kind cosine, scale 1), which streams the K×K matrix in tiles (K = the labels with two
examples or more, up to B/2); no new kernel is needed.

The pairs come from the labels alone, without PML's B×B positive mask: after a stable sort,
a label's first pair in row-major order is its first and second example (every example of
a label with two or more has a positive, the first one pairs first with the second).
Covers CosineSimilarity / DotProductSimilarity (PML's default, normalising or not, power
1) with any reducer; LpDistance (logits −d) and indices_tuple (pairs in the tuple's order)
go to the reference."""
from __future__ import annotations

import torch

from .. import _ext
from ..distances import CosineSimilarity, DotProductSimilarity
from ..ops.proxy_anchor import default_chunk
from ..ops.proxy_nca import COSINE, proxy_nca_rows
from ..reducers import reduce_loss_dict
from ..ops.unit_rows import normalized
from . import register


def supports(params, inp, expansion, need_ext: bool = True) -> bool:
    d = inp.distance
    # ref_emb is refused before this for a call; CrossBatchMemory's bank (fused.run_with_memory)
    # arrives as ref_emb and must reach the same refusal
    return ((_ext.HAS_EXT or not need_ext) and expansion is None and inp.indices_tuple is None
            and inp.labels is not None and inp.ref_emb is inp.embeddings
            and type(d) in (CosineSimilarity, DotProductSimilarity) and d.power == 1)


def pair_starts(sorted_labels):
    """Of sorted labels, the positions (B − 1 flags) where a run of two or more starts: each
    label with a positive pair once (NPairs' kept pairs; NPairsLoss.num_pairs counts them)."""
    starts = torch.ones_like(sorted_labels, dtype=torch.bool)
    starts[1:] = sorted_labels[1:] != sorted_labels[:-1]
    return starts[:-1] & ~starts[1:]


def first_pairs(labels):
    """(a, p): the first and second example of every label that has two or more, sorted by
    label: PML's first positive pair per anchor label (reference.npairs.unique_label_pos_pairs)."""
    order = torch.argsort(labels, stable=True)
    first = torch.nonzero(pair_starts(labels.index_select(0, order))).squeeze(1)
    return order[first], order[first + 1]


def pairs_loss(inp, reducer, a, p, chunk=None, rows_fn=None):
    """The N-pairs loss of the pairs (a_k, p_k): anchor k's softmax over every p_l, its own
    p_k the target (the fused ProxyNCA op over the K×K problem), reduced per anchor.
    rows_fn(anchors, positives, targets): another engine's ProxyNCA rows (default the CPU
    op's)."""
    x = inp.embeddings
    compiling = torch.compiler.is_compiling()
    if not compiling and len(a) == 0:
        return reduce_loss_dict({"loss": {"losses": 0, "indices": None,
                                          "reduction_type": "already_reduced"}}, reducer, x)
    xk = normalized(inp.distance, x)  # as the reference: its p, or none
    if compiling and chunk is None:  # a tile size from the batch, not from the data's K
        chunk = default_chunk(max(1, x.shape[0] // 2))
    if rows_fn is None:
        def rows_fn(xa, xp, targets):
            return proxy_nca_rows(xa, xp, targets, 1.0, COSINE, chunk)
    rows = rows_fn(xk.index_select(0, a), xk.index_select(0, p),
                   torch.arange(len(a), device=x.device))
    info = {"losses": rows, "indices": a, "reduction_type": "element"}
    if compiling:  # the number of pairs is data: no branch on it, the zero loss by a select
        # (item by item: torch 2.4's dynamo cannot trace dict.update with keywords)
        info["keep"] = torch.ones_like(rows, dtype=torch.bool)
        info["none_kept"] = "zero"
    return reduce_loss_dict({"loss": info}, reducer, x)


def impl(params, inp, reducer, chunk=None):
    return pairs_loss(inp, reducer, *first_pairs(inp.labels), chunk)


register("cpu", "NPairsLoss", supports, impl)
