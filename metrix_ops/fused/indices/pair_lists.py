"""Losses whose terms are the listed pairs themselves (PML gathers mat[a, p]: a pair listed
twice is two terms): ContrastiveLoss, NTXentLoss, LiftedStructureLoss over an indices_tuple.
Each builds the reference's loss dict from the pairs' distances (O(P)), so every reducer
reduces it exactly as there."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...reducers import reduce_loss_dict
from ...reference.pairs import pair_terms_present
from .. import register_indices
from .common import ZERO, ListedPairs, anchor_max, covers, long_pairs


def supports(params, inp, expansion) -> bool:
    return covers(inp, expansion)


def contrastive_impl(params, inp, reducer):
    a1, p, a2, n = long_pairs(inp)
    d = inp.distance
    pos_loss = neg_loss = 0
    if pair_terms_present((a1, p, a2, n)):  # PML: no loss unless some list has two pairs
        dp, dn = ListedPairs(inp).of_lists((a1, p), (a2, n))
        if len(a1) > 0:
            pos_loss = F.relu(d.margin(dp, params["pos_margin"]))
        if len(a2) > 0:
            neg_loss = F.relu(d.margin(params["neg_margin"], dn))
    return reduce_loss_dict({
        "pos_loss": {"losses": pos_loss, "indices": (a1, p), "reduction_type": "pos_pair"},
        "neg_loss": {"losses": neg_loss, "indices": (a2, n), "reduction_type": "neg_pair"},
    }, reducer, inp.embeddings)


def ntxent_impl(params, inp, reducer):
    """Per positive pair k: −log(e^{z_k} / (e^{z_k} + Σ_{negative pairs j of anchor a_k} e^{z_j})
    + tiny). The negatives' sum is per anchor, S_a = Σ_j e^{z_j − M_a} with M_a their max,
    rescaled to each pair's shift max(z_k, M_a) (the reference's, detached as PML's)."""
    a1, p, a2, n = long_pairs(inp)
    if not pair_terms_present((a1, p, a2, n)) or len(a1) == 0 or len(a2) == 0:
        return reduce_loss_dict({"loss": dict(ZERO)}, reducer, inp.embeddings)
    d, tau = inp.distance, params["temperature"]
    sign = 1.0 if d.is_inverted else -1.0  # a distance: closer is larger logit
    dp, dn = ListedPairs(inp).of_lists((a1, p), (a2, n))
    zp, zn = sign * dp / tau, sign * dn / tau
    b = inp.embeddings.shape[0]
    m, has = anchor_max(zn, a2, b)
    neg_sum = zn.new_zeros(b).index_add(0, a2, torch.exp(zn - m[a2]))
    mk, hk = m[a1], has[a1]
    # an anchor with no negative: shift z_k, negative sum 0 (S_a = 0), loss −log(1 + tiny)
    shift = torch.where(hk, torch.maximum(zp.detach(), mk), zp.detach())
    num = torch.exp(zp - shift)
    den = num + neg_sum[a1] * torch.exp(mk - shift)
    losses = -torch.log(num / den + torch.finfo(dp.dtype).tiny)
    return reduce_loss_dict({"loss": {"losses": losses, "indices": (a1, p),
                                      "reduction_type": "pos_pair"}}, reducer, inp.embeddings)


def lifted_impl(params, inp, reducer):
    """Per positive pair (a, p): ½[log Σ_{negative pairs (a2, n) with a2 ∈ {a, p}} e^{m⁻ − d}
    + d(a, p) − m⁺]₊², the negatives' log-sum-exp merged from per-anchor (max, sum) of a and
    of p (once when a = p: the reference's mask is an OR). PML's quirk kept: p is compared
    with the anchor index a2 even when it indexes ref_emb."""
    a1, p, a2, n = long_pairs(inp)
    if not pair_terms_present((a1, p, a2, n)) or len(a1) == 0 or len(a2) == 0:
        return reduce_loss_dict({"loss": dict(ZERO)}, reducer, inp.embeddings)
    d = inp.distance
    dp, dn = ListedPairs(inp).of_lists((a1, p), (a2, n))
    v = d.margin(params["neg_margin"], dn)
    size = max(inp.embeddings.shape[0], inp.ref_emb.shape[0])  # p may index past the batch
    m, has = anchor_max(v, a2, size)
    sums = v.new_zeros(size).index_add(0, a2, torch.exp(v - m[a2]))
    h1, h2 = has[a1], has[p] & (p != a1)
    neg_inf = torch.full_like(dp, float("-inf"))
    top = torch.maximum(torch.where(h1, m[a1], neg_inf), torch.where(h2, m[p], neg_inf))
    any_neg = h1 | h2
    top = torch.where(any_neg, top, torch.zeros_like(top))
    # an anchor without negatives has sum 0; the exponents are clamped where unused so that
    # no inf (and no NaN gradient) appears in a discarded branch
    total = (sums[a1] * torch.exp(torch.where(h1, m[a1] - top, torch.zeros_like(top)))
             + torch.where(h2, sums[p], torch.zeros_like(top))
             * torch.exp(torch.where(h2, m[p] - top, torch.zeros_like(top))))
    lse = torch.where(any_neg, top + torch.log(torch.where(any_neg, total, torch.ones_like(total))),
                      torch.zeros_like(top))
    losses = F.relu(lse + d.margin(dp, params["pos_margin"])) ** 2 / 2
    return reduce_loss_dict({"loss": {"losses": losses, "indices": (a1, p),
                                      "reduction_type": "pos_pair"}}, reducer, inp.embeddings)


register_indices("cpu", "ContrastiveLoss", supports, contrastive_impl)
register_indices("cpu", "NTXentLoss", supports, ntxent_impl)
register_indices("cpu", "LiftedStructureLoss", supports, lifted_impl)
