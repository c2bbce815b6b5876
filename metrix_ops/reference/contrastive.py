"""ContrastiveLoss (Hadsell et al. 2006) with PML's semantics: per-pair hinge terms,
positive and negative sub-losses reduced apart (AvgNonZero by default), then summed."""
from __future__ import annotations

import torch.nn.functional as F

from ..distances import LpDistance
from ..reducers import AvgNonZeroReducer
from ..spec import LossInputs, register_loss
from .pairs import to_pairs


@register_loss("ContrastiveLoss", LpDistance, AvgNonZeroReducer,
               sub_losses=("pos_loss", "neg_loss"))
def contrastive_loss_dict(inp: LossInputs, pos_margin=0.0, neg_margin=1.0):
    a1, p, a2, n = to_pairs(inp.indices_tuple, inp.labels, inp.ref_labels, inp.same_set)
    d = inp.distance
    pos_loss = neg_loss = 0
    # PML returns zero losses when neither side has more than one pair.
    if not all(len(x) <= 1 for x in (a1, p, a2, n)):
        mat = d(inp.embeddings, inp.ref_emb)
        if len(a1) > 0:
            pos_loss = F.relu(d.margin(mat[a1, p], pos_margin))
        if len(a2) > 0:
            neg_loss = F.relu(d.margin(neg_margin, mat[a2, n]))
    return {
        "pos_loss": {"losses": pos_loss, "indices": (a1, p), "reduction_type": "pos_pair"},
        "neg_loss": {"losses": neg_loss, "indices": (a2, n), "reduction_type": "neg_pair"},
    }
