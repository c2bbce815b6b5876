"""LiftedStructureLoss (Oh Song et al. 2016) and its generalised form, PML's semantics.

Lifted: per positive pair (a, p), ½[log Σ_{n of a or p} e^{m_neg − d(·,n)} + d(a,p) − m_pos]₊²,
pos-pair reduced. Generalised: per anchor [log Σ_P e^{d−m_pos} + log Σ_N e^{m_neg−d}]₊,
element reduced."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..distances import LpDistance
from ..reducers import MeanReducer
from ..spec import LossInputs, register_loss
from .lse import masked_logsumexp
from .pairs import mat_and_masks, pair_terms_present, to_pairs

ZERO = {"losses": 0, "indices": None, "reduction_type": "already_reduced"}


@register_loss("LiftedStructureLoss", LpDistance, MeanReducer)
def lifted_structure_loss_dict(inp: LossInputs, neg_margin=1.0, pos_margin=0.0):
    a1, p, a2, n = to_pairs(inp.indices_tuple, inp.labels, inp.ref_labels, inp.same_set)
    if not pair_terms_present((a1, p, a2, n)) or len(a1) == 0 or len(a2) == 0:
        return {"loss": dict(ZERO)}
    d = inp.distance
    mat = d(inp.embeddings, inp.ref_emb)
    pos_d, neg_d = mat[a1, p], mat[a2, n]
    # a negative pair (a2, n) counts for the positive pair (a1, p) when a2 is a1 or p
    # (PML compares batch indices: with ref_emb, p indexes the reference set)
    keep = (a2[None, :] == a1[:, None]) | (a2[None, :] == p[:, None])
    neg_terms = d.margin(neg_margin, neg_d[None, :] * keep.to(neg_d.dtype))
    lse = masked_logsumexp(neg_terms, keep, add_one=False).squeeze(1)
    losses = F.relu(lse + d.margin(pos_d, pos_margin)) ** 2 / 2  # each pair is seen twice
    return {"loss": {"losses": losses, "indices": (a1, p), "reduction_type": "pos_pair"}}


@register_loss("GeneralizedLiftedStructureLoss", LpDistance, MeanReducer)
def generalized_lifted_structure_loss_dict(inp: LossInputs, neg_margin=1.0, pos_margin=0.0):
    found = mat_and_masks(inp)
    if found is None:
        return {"loss": dict(ZERO)}
    mat, pos, neg = found
    d = inp.distance
    pos_loss = masked_logsumexp(d.margin(mat, pos_margin), pos, add_one=False)
    neg_loss = masked_logsumexp(d.margin(neg_margin, mat), neg, add_one=False)
    losses = F.relu(pos_loss + neg_loss).squeeze(1)
    return {"loss": {"losses": losses, "indices": torch.arange(len(losses), device=mat.device),
                     "reduction_type": "element"}}
