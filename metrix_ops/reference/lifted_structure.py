"""LiftedStructureLoss (Oh Song et al. 2016), PML's pair-based form.

Per positive pair (a, p): ½·[log Σ_{n ∈ N(a) ∪ N(p)} e^{m_neg − d(·,n)} + d(a,p) − m_pos]₊²,
pos-pair reduced (mean over positive pairs by default). The ½ is PML's: each unordered
positive pair appears twice, as (a, p) and (p, a). Margins go through `distance.margin`, so
with a similarity they flip as in PML."""
from __future__ import annotations

import torch.nn.functional as F

from ..distances import LpDistance
from ..reducers import MeanReducer
from ..spec import LossInputs, register_loss
from .lse import masked_logsumexp
from .pairs import pair_terms_present, to_pairs

ZERO = {"losses": 0, "indices": None, "reduction_type": "already_reduced"}


@register_loss("LiftedStructureLoss", LpDistance, MeanReducer)
def lifted_structure_loss_dict(inp: LossInputs, neg_margin=1.0, pos_margin=0.0):
    a1, p, a2, n = to_pairs(inp.indices_tuple, inp.labels, inp.ref_labels, inp.same_set)
    # PML: zero loss when no index list has two entries, or when either side is empty
    if not pair_terms_present((a1, p, a2, n)) or len(a1) == 0 or len(a2) == 0:
        return {"loss": dict(ZERO)}
    d = inp.distance
    mat = d(inp.embeddings, inp.ref_emb)
    pos_d, neg_d = mat[a1, p], mat[a2, n]
    # The negative pair (a2, n) counts for the positive pair (a1, p) when its anchor a2 is
    # a1 or p. PML quirk kept: it compares the *anchor* index a2 with p even when p indexes
    # the reference set (ref_emb given), where the two index different tensors.
    keep = (a2[None, :] == a1[:, None]) | (a2[None, :] == p[:, None])
    # PML multiplies the negatives by the 0/1 mask before the margin; the masked entries are
    # dropped by the log-sum-exp anyway, and the product keeps their gradient exactly zero.
    neg_terms = d.margin(neg_margin, neg_d[None, :] * keep.to(neg_d.dtype))
    # a positive pair with no negative of its own gets log-sum-exp 0 (PML's empty-row rule)
    lse = masked_logsumexp(neg_terms, keep, add_one=False).squeeze(1)
    losses = F.relu(lse + d.margin(pos_d, pos_margin)) ** 2 / 2
    return {"loss": {"losses": losses, "indices": (a1, p), "reduction_type": "pos_pair"}}
