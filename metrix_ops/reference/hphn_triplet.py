"""HPHNTripletLoss: the Embedding Expansion paper's triplet loss with hard positive and
hard negative (pair) mining — batch-hard triplet (Hermans et al. 2017) over the originals.

    L = reduce_i [ d(x_i, x_p*) − d(x_i, x_n*) + m ]₊,
    p* = the farthest positive of i, n* = the closest negative of i,

over the anchors that have a positive and a negative; "mean" (default) or "sum" over them
(zero, with a graph, when no anchor has both). This is exactly PML's
`TripletMarginLoss(margin, reducer=MeanReducer())` on `BatchHardMiner()` triplets, which
drops anchors lacking a positive or a negative (the official code keeps them: an anchor
without a positive there gets d_ap = its clipped self-distance 1e-6, so a term ≈ [m − d_an]₊,
and one without a negative gets d_an = its row's largest distance). Ties go to the lowest
index, as PML. ref_emb/ref_labels work as in PML (self pairs are excluded only when the
references are the batch).

With `expansion=mo.Expansion(n)` the hardest negative becomes the closest pair between the
anchor side (x_i and the synthetic points on its segments) and every original or synthetic
point of another class; positives stay originals (reference/expansion_mining.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..distances import LpDistance
from ..reducers import MeanReducer
from ..spec import LossInputs, register_loss
from .pairs import match_masks

ZERO = {"loss": {"losses": 0, "indices": None, "reduction_type": "already_reduced"}}


def hardest_pair(mat: torch.Tensor, mask: torch.Tensor, inverted: bool, farthest: bool):
    """Per row, the metric of the hardest masked entry (the farthest if `farthest`, else the
    closest; for a similarity "far" is small), with gradient to that entry only, and whether
    the row has any masked entry. Ties go to the lowest column, as torch.max/min."""
    take_max = farthest != inverted
    m = mat.masked_fill(~mask, float("-inf") if take_max else float("inf"))
    col = m.argmax(1) if take_max else m.argmin(1)
    return mat.gather(1, col[:, None]).squeeze(1), mask.any(1)


def hphn_terms(hardest_pos, has_pos, hardest_neg, has_neg, distance, margin) -> dict:
    """The loss dict: one element per anchor with a positive and a negative. Every anchor's
    term, with the reducer told which count (`keep`) and no kept anchor giving the zero
    loss: no data-dependent shape or branch, so no host sync on a GPU and one graph under
    torch.compile. A dropped anchor's term is finite (hardest_pair's entries are real ones),
    and the reducers' selects give it no gradient."""
    keep = has_pos & has_neg
    losses = F.relu(distance.margin(hardest_pos, hardest_neg) + margin)
    return {"loss": {"losses": losses, "indices": torch.arange(len(keep), device=keep.device),
                     "reduction_type": "element", "keep": keep, "none_kept": "zero"}}


@register_loss("HPHNTripletLoss", LpDistance, MeanReducer, supports_indices_tuple=False)
def hphn_triplet_loss_dict(inp: LossInputs, margin=0.2):
    d = inp.distance
    pos, neg = match_masks(inp.labels, inp.ref_labels, inp.same_set)
    mat = d(inp.embeddings, inp.ref_emb)
    hp, has_pos = hardest_pair(mat, pos, d.is_inverted, farthest=True)
    hn, has_neg = hardest_pair(mat, neg, d.is_inverted, farthest=False)
    return hphn_terms(hp, has_pos, hn, has_neg, d, margin)
