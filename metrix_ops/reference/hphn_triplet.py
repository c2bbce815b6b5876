"""HPHNTripletLoss, the Embedding Expansion paper's batch-hard triplet with hard positive
and hard negative (pair) mining: mean (or sum) over original anchors with a positive and
a negative of [max_p d(i,p) − min_q d(i,q) + m]₊. Without expansion it is batch-hard
triplet (PML: TripletMarginLoss(margin, reducer=MeanReducer()) on BatchHardMiner triplets);
with `expansion=` the negative side includes synthetic points (reference/expansion.py)."""
from __future__ import annotations

from ..config import Expansion
from ..distances import LpDistance
from ..reducers import MeanReducer
from ..spec import LossInputs, register_loss


@register_loss("HPHNTripletLoss", LpDistance, MeanReducer, supports_ref_emb=False,
               supports_indices_tuple=False)
def hphn_triplet_loss_dict(inp: LossInputs, margin=0.2):
    from .expansion import ExpandedBatch, hphn
    return hphn(ExpandedBatch(inp, Expansion(n_points=0)), margin)
