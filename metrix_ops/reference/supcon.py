"""SupConLoss (Khosla et al. 2020), PML's form: per anchor, minus the mean over its
positives of log softmax(s/τ) taken over its positives and negatives; AvgNonZero reduced."""
from __future__ import annotations

import torch

from ..distances import CosineSimilarity
from ..reducers import AvgNonZeroReducer
from ..spec import LossInputs, register_loss
from .lse import masked_logsumexp
from .pairs import mat_and_masks


@register_loss("SupConLoss", CosineSimilarity, AvgNonZeroReducer)
def supcon_loss_dict(inp: LossInputs, temperature=0.1):
    found = mat_and_masks(inp)
    # PML: zero loss unless the call has at least one positive and one negative pair
    if found is None or not found[1].any() or not found[2].any():
        return {"loss": {"losses": 0, "indices": None, "reduction_type": "already_reduced"}}
    mat, pos, neg = found
    logits = (mat if inp.distance.is_inverted else -mat) / temperature
    # the row max is over every column, pair or not (as PML); a constant per row, so it
    # changes nothing but the range of the exponentials
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    log_prob = logits - masked_logsumexp(logits, pos | neg, add_one=False)
    # anchors without positives get 0/tiny = 0 (AvgNonZero drops them); an anchor without
    # negatives still pays the softmax over its positives alone (log #P when they tie), as PML
    posf = pos.to(mat.dtype)
    mean_log_prob_pos = (posf * log_prob).sum(1) / (posf.sum(1) + torch.finfo(mat.dtype).tiny)
    losses = -mean_log_prob_pos
    return {"loss": {"losses": losses, "indices": torch.arange(len(losses), device=mat.device),
                     "reduction_type": "element"}}
