"""TripletMarginLoss, PML's semantics: triplets from indices_tuple, or all of them
("all"), or `triplets_per_anchor` random ones per anchor; [margin(d_ap, d_an) + m]₊
(softplus when smooth_loss; `swap` uses the positive–negative distance when it is
harder); AvgNonZero over triplets by default."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..distances import LpDistance
from ..reducers import AvgNonZeroReducer
from ..spec import LossInputs, register_loss
from .pairs import match_masks, to_triplets


def random_triplets(labels, ref_labels, same_set, per_anchor: int):
    """`per_anchor` triplets for each anchor with a positive and a negative: positive and
    negative drawn uniformly (with replacement) from the anchor's own sets."""
    pos, neg = match_masks(labels, ref_labels, same_set)
    ok = torch.where(pos.any(1) & neg.any(1))[0]
    if len(ok) == 0:
        e = torch.empty(0, dtype=torch.long, device=labels.device)
        return e, e.clone(), e.clone()
    a = ok.repeat_interleave(per_anchor)
    p = torch.multinomial(pos[a].float(), 1).squeeze(1)
    n = torch.multinomial(neg[a].float(), 1).squeeze(1)
    return a, p, n


def triplet_terms(inp: LossInputs, a, p, n, margin, swap, smooth_loss):
    d = inp.distance
    mat = d(inp.embeddings, inp.ref_emb)
    ap, an = mat[a, p], mat[a, n]
    if swap:
        # p and n index the reference set; PML indexes the query×reference matrix here,
        # which is only right without ref_emb (and fails with it)
        pn = mat[p, n] if inp.same_set and inp.ref_emb is inp.embeddings else \
            d(inp.ref_emb, inp.ref_emb)[p, n]
        an = d.smallest_dist(an, pn)
    violation = d.margin(ap, an) + margin
    return F.softplus(violation) if smooth_loss else F.relu(violation)


@register_loss("TripletMarginLoss", LpDistance, AvgNonZeroReducer)
def triplet_margin_loss_dict(inp: LossInputs, margin=0.05, swap=False, smooth_loss=False,
                             triplets_per_anchor="all"):
    if inp.indices_tuple is None and triplets_per_anchor != "all":
        a, p, n = random_triplets(inp.labels, inp.ref_labels, inp.same_set, int(triplets_per_anchor))
    else:
        a, p, n = to_triplets(inp.indices_tuple, inp.labels, inp.ref_labels, inp.same_set)
    if len(a) == 0:
        return {"loss": {"losses": 0, "indices": None, "reduction_type": "already_reduced"}}
    losses = triplet_terms(inp, a, p, n, margin, swap, smooth_loss)
    return {"loss": {"losses": losses, "indices": (a, p, n), "reduction_type": "triplet"}}
