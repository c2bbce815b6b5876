"""Losses reduced per anchor over the listed pairs taken as B×M masks in the reference (a pair
listed twice counts once): MultiSimilarityLoss, CircleLoss, SupConLoss,
GeneralizedLiftedStructureLoss over an indices_tuple. The pairs are made distinct, their
distances come from the pair op, and each anchor's log-sum-exps are scatters (O(P + B))."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...distances import CosineSimilarity
from ...reducers import reduce_loss_dict
from ...reference.pairs import pair_terms_present
from .. import register_indices
from .common import ZERO, ListedPairs, anchor_lse, covers, long_pairs, unique_pairs


def supports(params, inp, expansion) -> bool:
    return covers(inp, expansion)


def circle_supports(params, inp, expansion) -> bool:
    # the reference (as PML) refuses any other distance with a ValueError: that path says so
    return covers(inp, expansion) and type(inp.distance) is CosineSimilarity


def _masks(inp):
    """(distinct positive pairs, distinct negative pairs, their distances, B), or None when
    PML gives zero losses (no index list with two entries)."""
    a1, p, a2, n = long_pairs(inp)
    if not pair_terms_present((a1, p, a2, n)):
        return None
    m = inp.ref_emb.shape[0]
    pos, neg = unique_pairs(a1, p, m), unique_pairs(a2, n, m)
    dp, dn = ListedPairs(inp).of_lists(pos, neg)
    return pos, neg, dp, dn, inp.embeddings.shape[0]


def _per_anchor(losses, reducer, inp):
    idx = torch.arange(len(losses), device=losses.device)
    return reduce_loss_dict({"loss": {"losses": losses, "indices": idx,
                                      "reduction_type": "element"}}, reducer, inp.embeddings)


def _zero(reducer, inp):
    return reduce_loss_dict({"loss": dict(ZERO)}, reducer, inp.embeddings)


def ms_impl(params, inp, reducer):
    found = _masks(inp)
    if found is None:
        return _zero(reducer, inp)
    (pr, _), (nr, _), dp, dn, b = found
    d, alpha, beta, base = inp.distance, params["alpha"], params["beta"], params["base"]
    pos = anchor_lse(alpha * d.margin(dp, base), pr, b, add_one=True) / alpha
    neg = anchor_lse(beta * d.margin(base, dn), nr, b, add_one=True) / beta
    return _per_anchor(pos + neg, reducer, inp)


def generalized_lifted_impl(params, inp, reducer):
    found = _masks(inp)
    if found is None:
        return _zero(reducer, inp)
    (pr, _), (nr, _), dp, dn, b = found
    d = inp.distance
    pos = anchor_lse(d.margin(dp, params["pos_margin"]), pr, b, add_one=False)
    neg = anchor_lse(d.margin(params["neg_margin"], dn), nr, b, add_one=False)
    return _per_anchor(F.relu(pos + neg), reducer, inp)


def circle_impl(params, inp, reducer):
    found = _masks(inp)
    if found is None:
        return _zero(reducer, inp)
    (pr, _), (nr, _), sp, sn, b = found
    m, gamma = params["m"], params["gamma"]
    op, on, delta_p, delta_n = 1 + m, -m, 1 - m, m  # as reference/circle.py
    # the weights [O_p − s]₊, [s − O_n]₊ are constants of the step (detached), as there
    lse_p = anchor_lse(-gamma * F.relu(op - sp.detach()) * (sp - delta_p), pr, b, add_one=False)
    lse_n = anchor_lse(gamma * F.relu(sn.detach() - on) * (sn - delta_n), nr, b, add_one=False)
    # anchors lacking a positive or a negative give 0
    valid = (torch.bincount(pr, minlength=b) > 0) & (torch.bincount(nr, minlength=b) > 0)
    return _per_anchor(F.softplus(lse_p + lse_n) * valid.to(sp.dtype), reducer, inp)


def supcon_impl(params, inp, reducer):
    """Per anchor: −mean over its positives of z_p − log Σ_{pairs of the anchor} e^z, the
    softmax over the union of its positive and negative pairs (a pair in both lists once).
    The reference first subtracts each row's max over all M columns, a constant that cancels
    in z − log Σ e^z; here the log-sum-exp's own per-anchor shift keeps it stable."""
    found = _masks(inp)
    if found is None or len(found[0][0]) == 0 or len(found[1][0]) == 0:
        return _zero(reducer, inp)  # PML: a positive and a negative pair, or no loss
    (pr, pc), (nr, nc), dp, _, b = found
    ur, uc = unique_pairs(torch.cat([pr, nr]), torch.cat([pc, nc]), inp.ref_emb.shape[0])
    lists = ListedPairs(inp)
    sign = 1.0 if inp.distance.is_inverted else -1.0
    tau = params["temperature"]
    zp, zu = sign * dp / tau, sign * lists.of(ur, uc) / tau
    log_prob = zp - anchor_lse(zu, ur, b, add_one=False)[pr]
    total = zp.new_zeros(b).index_add(0, pr, log_prob)
    count = torch.bincount(pr, minlength=b).to(zp.dtype)
    # anchors without positives: 0 / tiny = 0, which AvgNonZero leaves out
    return _per_anchor(-total / (count + torch.finfo(zp.dtype).tiny), reducer, inp)


register_indices("cpu", "MultiSimilarityLoss", supports, ms_impl)
register_indices("cpu", "GeneralizedLiftedStructureLoss", supports, generalized_lifted_impl)
register_indices("cpu", "CircleLoss", circle_supports, circle_impl)
register_indices("cpu", "SupConLoss", supports, supcon_impl)
