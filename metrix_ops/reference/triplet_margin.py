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
    """`per_anchor` random triplets for every anchor that has a positive and a negative:
    PML's get_random_triplet_indices draw for draw, so that a seeded run gives PML's triplets.
    Per label (ascending), its anchors' positives uniform over the label's references (the
    anchor itself excluded when the references are the batch), then the negatives uniform
    over the other labels' references, both with replacement, from the global CPU generator
    (torch.randint, as PML, whatever the labels' device)."""
    dev = labels.device
    a_idx, p_idx, n_idx = [], [], []
    for label in torch.unique(labels):
        p_inds = torch.where(ref_labels == label)[0]
        a_inds = p_inds if same_set else torch.where(labels == label)[0]
        n_inds = torch.where(ref_labels != label)[0]
        n_a, n_p = len(a_inds), len(p_inds)
        if n_p < (2 if same_set else 1) or len(n_inds) < 1:
            continue
        num = n_a * per_anchor
        cand = p_inds.expand((n_a, n_p))
        if same_set:  # an anchor is not its own positive
            cand = cand[~torch.eye(n_a, dtype=torch.bool, device=dev)].view(n_a, n_a - 1)
        p_ = torch.randint(0, cand.shape[1], (num,)).to(dev)
        a_ = torch.arange(n_a).view(-1, 1).repeat(1, per_anchor).view(num).to(dev)
        n_ = torch.randint(0, len(n_inds), (num,)).to(dev)
        a_idx.append(a_inds[a_])
        p_idx.append(cand[a_, p_])
        n_idx.append(n_inds[n_])
    if not a_idx:
        e = torch.empty(0, dtype=torch.long, device=dev)
        return e, e.clone(), e.clone()
    return torch.cat(a_idx), torch.cat(p_idx), torch.cat(n_idx)


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
