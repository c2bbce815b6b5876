"""GeneralizedLiftedStructureLoss (Hermans et al. 2017, "In Defense of the Triplet Loss",
p. 4), PML's form: per anchor [log Σ_P e^{d − m_pos} + log Σ_N e^{m_neg − d}]₊, element
reduced (mean over all anchors by default). Margins go through `distance.margin`."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..distances import LpDistance
from ..reducers import MeanReducer
from ..spec import LossInputs, register_loss
from .lse import masked_logsumexp
from .pairs import mat_and_masks


@register_loss("GeneralizedLiftedStructureLoss", LpDistance, MeanReducer)
def generalized_lifted_structure_loss_dict(inp: LossInputs, neg_margin=1.0, pos_margin=0.0):
    found = mat_and_masks(inp)
    if found is None:
        return {"loss": {"losses": 0, "indices": None, "reduction_type": "already_reduced"}}
    mat, pos, neg = found
    d = inp.distance
    # no "+1" inside either log (unlike MS); a side with no pairs contributes 0 (PML's
    # masked log-sum-exp), so an anchor with negatives only still pays log Σ_N e^{m−d}
    pos_loss = masked_logsumexp(d.margin(mat, pos_margin), pos, add_one=False)
    neg_loss = masked_logsumexp(d.margin(neg_margin, mat), neg, add_one=False)
    losses = F.relu(pos_loss + neg_loss).squeeze(1)
    return {"loss": {"losses": losses, "indices": torch.arange(len(losses), device=mat.device),
                     "reduction_type": "element"}}
