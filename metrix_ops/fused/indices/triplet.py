"""TripletMarginLoss over an indices_tuple: the tuple's triplets, or from a pair tuple every
(a, p, n) whose positive and negative pairs share their anchor (PML's convert_to_triplets),
in the reference's order. The pairs' distances are computed once per pair (O(P)) and
gathered per triplet; the join sorts the negative pairs by anchor instead of the
reference's P⁺×P⁻ match matrix, so memory is O(P + T) for the T triplets the tuple implies."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...reducers import reduce_loss_dict
from ...reference.triplet_margin import check_triplets_per_anchor
from .. import register_indices
from .common import ZERO, ListedPairs, covers


def supports(params, inp, expansion) -> bool:
    # an indices_tuple wins over triplets_per_anchor (as in PML), so any value is covered
    return covers(inp, expansion)


def pairs_to_triplets(a1, p, a2, n):
    """(i, j): positive pair i and negative pair j for every a1[i] == a2[j], row-major in
    (i, j) as torch.where over the match matrix: j ascending within each i."""
    a2_sorted, order = torch.sort(a2, stable=True)  # stable: j ascending within an anchor
    lo = torch.searchsorted(a2_sorted, a1)
    count = torch.searchsorted(a2_sorted, a1, right=True) - lo
    i = torch.repeat_interleave(torch.arange(len(a1), device=a1.device), count)
    starts = torch.cumsum(count, 0) - count  # first triplet of each positive pair
    j = order[lo[i] + torch.arange(len(i), device=a1.device) - starts[i]]
    return i, j


def impl(params, inp, reducer):
    check_triplets_per_anchor(params.get("triplets_per_anchor", "all"))  # as the reference
    t = tuple(x.long() for x in inp.indices_tuple)
    lists = ListedPairs(inp)
    if len(t) == 3:
        a, p, n = t
        ap, an = lists.of_lists((a, p), (a, n))
    else:
        a1, p1, a2, n2 = t
        i, j = pairs_to_triplets(a1, p1, a2, n2)
        a, p, n = a1[i], p1[i], n2[j]
        if len(a):
            dp, dn = lists.of_lists((a1, p1), (a2, n2))
            ap, an = dp[i], dn[j]
    if len(a) == 0:
        return reduce_loss_dict({"loss": dict(ZERO)}, reducer, inp.embeddings)
    d = inp.distance
    if params.get("swap", False):
        # d(r_p, r_n): both index the references (reference/triplet_margin.py explains why
        # this is the true distance also when ref_emb is given)
        an = d.smallest_dist(an, lists.of(p, n, refs_both=True))
    violation = d.margin(ap, an) + params["margin"]
    losses = F.softplus(violation) if params.get("smooth_loss", False) else F.relu(violation)
    return reduce_loss_dict({"loss": {"losses": losses, "indices": (a, p, n),
                                      "reduction_type": "triplet"}}, reducer, inp.embeddings)


register_indices("cpu", "TripletMarginLoss", supports, impl)
