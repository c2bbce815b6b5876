"""NTXentLoss (InfoNCE / SimCLR), PML's form: per positive pair (a, p),
−log(e^{s_ap/τ} / (e^{s_ap/τ} + Σ_{negatives of a} e^{s_an/τ}) + tiny), pos-pair reduced."""
from __future__ import annotations

import torch

from ..distances import CosineSimilarity
from ..reducers import MeanReducer
from ..spec import LossInputs, register_loss
from .pairs import pair_terms_present, to_pairs


@register_loss("NTXentLoss", CosineSimilarity, MeanReducer)
def ntxent_loss_dict(inp: LossInputs, temperature=0.07):
    a1, p, a2, n = to_pairs(inp.indices_tuple, inp.labels, inp.ref_labels, inp.same_set)
    if not pair_terms_present((a1, p, a2, n)) or len(a1) == 0 or len(a2) == 0:
        return {"loss": {"losses": 0, "indices": None, "reduction_type": "already_reduced"}}
    mat = inp.distance(inp.embeddings, inp.ref_emb)
    sign = 1.0 if inp.distance.is_inverted else -1.0  # a distance: closer is larger logit
    pos = sign * mat[a1, p][:, None] / temperature
    neg = sign * mat[a2, n][None, :] / temperature
    same_anchor = a2[None, :] == a1[:, None]
    # only the negatives of the pair's own anchor enter its denominator (PML fills the rest
    # with finfo.min; −inf gives the same exp 0 and zero gradient). A positive pair whose
    # anchor has no negative gets loss −log(1 + tiny) ≈ 0, yet still counts in the mean.
    neg = neg.masked_fill(~same_anchor, float("-inf"))
    # the shift is a constant of each row (detached, as PML) for a stable softmax
    shift = torch.maximum(pos, neg.max(dim=1, keepdim=True).values).detach()
    num = torch.exp(pos - shift).squeeze(1)
    den = torch.exp(neg - shift).sum(dim=1) + num
    # PML adds the dtype's tiny inside the log (guards log 0 when a negative dominates)
    losses = -torch.log(num / den + torch.finfo(mat.dtype).tiny)
    return {"loss": {"losses": losses, "indices": (a1, p), "reduction_type": "pos_pair"}}
