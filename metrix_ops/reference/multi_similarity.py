"""MultiSimilarityLoss (Wang et al. 2019), PML's form: per anchor
(1/α) log(1 + Σ_P e^{−α(s−base)}) + (1/β) log(1 + Σ_N e^{β(s−base)}), element-reduced
(mean over all anchors by default, anchors with no pair contributing 0)."""
from __future__ import annotations

import torch

from ..distances import CosineSimilarity
from ..reducers import MeanReducer
from ..spec import LossInputs, register_loss
from .lse import masked_logsumexp
from .pairs import mat_and_masks


@register_loss("MultiSimilarityLoss", CosineSimilarity, MeanReducer)
def multi_similarity_loss_dict(inp: LossInputs, alpha=2.0, beta=50.0, base=0.5):
    found = mat_and_masks(inp)
    if found is None:
        return {"loss": {"losses": 0, "indices": None, "reduction_type": "already_reduced"}}
    mat, pos, neg = found
    d = inp.distance
    # log(1 + Σ e^x) as a log-sum-exp with a 0 logit appended (PML's add_one): at β=50 the
    # negatives' e^{β(s−base)} reach e^25, past fp16's range, and past fp32's for β ≳ 180.
    # A side with no pairs gives 0 = log(1), so anchors with nothing still count in the mean.
    pos_loss = masked_logsumexp(alpha * d.margin(mat, base), pos, add_one=True) / alpha
    neg_loss = masked_logsumexp(beta * d.margin(base, mat), neg, add_one=True) / beta
    losses = (pos_loss + neg_loss).squeeze(1)
    return {"loss": {"losses": losses, "indices": torch.arange(len(losses), device=mat.device),
                     "reduction_type": "element"}}
