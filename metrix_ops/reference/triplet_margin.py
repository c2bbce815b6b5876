"""TripletMarginLoss (Weinberger & Saul 2009; Schroff et al. 2015) with PML's semantics.

Triplets come from `indices_tuple` (a 4-tuple of pairs becomes every (a, p, n) whose two
pairs share their anchor), else all of them (`triplets_per_anchor="all"`), else
`triplets_per_anchor` random ones per anchor. Each term is [margin(d_ap, d_an) + m]₊
(softplus when `smooth_loss`); `swap` uses the positive–negative distance when it is the
harder one. Default reducer AvgNonZero over triplets.
"""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from ..distances import LpDistance
from ..reducers import AvgNonZeroReducer
from ..spec import LossInputs, register_loss
from .pairs import match_masks, to_triplets


def check_triplets_per_anchor(t) -> None:
    if isinstance(t, str):
        if t != "all":
            raise ValueError(f"triplets_per_anchor must be 'all' or an int >= 0, got {t!r}")
    elif isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0:
        raise ValueError(f"triplets_per_anchor must be 'all' or an int >= 0, got {t!r}")


def random_triplets(labels, ref_labels, same_set: bool, per_anchor: int):
    """`per_anchor` random triplets for every anchor that has a positive and a negative.

    The distribution is PML's (get_random_triplet_indices): the positive uniform over the
    anchor's positives (itself excluded when the references are the batch), the negative
    uniform over its negatives, both drawn with replacement. PML groups its output by
    label; the order differs here, which no reducer sees. Uses the global torch RNG."""
    pos, neg = match_masks(labels, ref_labels, same_set)
    ok = torch.where(pos.any(1) & neg.any(1))[0]
    if len(ok) == 0 or per_anchor == 0:
        e = torch.empty(0, dtype=torch.long, device=labels.device)
        return e, e.clone(), e.clone()
    # multinomial over a 0/1 row is uniform over that row's True entries
    p = torch.multinomial(pos[ok].float(), per_anchor, replacement=True).reshape(-1)
    n = torch.multinomial(neg[ok].float(), per_anchor, replacement=True).reshape(-1)
    return ok.repeat_interleave(per_anchor), p, n


def triplet_terms(inp: LossInputs, a, p, n, margin, swap, smooth_loss):
    d = inp.distance
    mat = d(inp.embeddings, inp.ref_emb)
    ap, an = mat[a, p], mat[a, n]
    if swap:
        # p and n both index the reference set, so d(p, n) is a reference×reference
        # distance. PML reads it from the query×reference matrix, which is the same thing
        # only when the references are the batch; with ref_emb PML's value is wrong (or an
        # index error), so there we deliberately compute the true d(r_p, r_n) instead.
        pn = mat[p, n] if inp.ref_emb is inp.embeddings else d(inp.ref_emb, inp.ref_emb)[p, n]
        an = d.smallest_dist(an, pn)
    violation = d.margin(ap, an) + margin
    return F.softplus(violation) if smooth_loss else F.relu(violation)


# as in PML, labels may be None when an indices_tuple is given (validation allows that)
@register_loss("TripletMarginLoss", LpDistance, AvgNonZeroReducer)
def triplet_margin_loss_dict(inp: LossInputs, margin=0.05, swap=False, smooth_loss=False,
                             triplets_per_anchor="all"):
    check_triplets_per_anchor(triplets_per_anchor)
    if inp.indices_tuple is None and triplets_per_anchor != "all":
        # an explicit indices_tuple wins over triplets_per_anchor, as in PML
        a, p, n = random_triplets(inp.labels, inp.ref_labels, inp.same_set,
                                  int(triplets_per_anchor))
    else:
        a, p, n = to_triplets(inp.indices_tuple, inp.labels, inp.ref_labels, inp.same_set)
    if len(a) == 0:
        return {"loss": {"losses": 0, "indices": None, "reduction_type": "already_reduced"}}
    losses = triplet_terms(inp, a, p, n, margin, swap, smooth_loss)
    return {"loss": {"losses": losses, "indices": (a, p, n), "reduction_type": "triplet"}}
