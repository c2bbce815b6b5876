"""TripletMarginLoss with miner=BatchHardMiner on the Triton engine: each anchor's hardest
positive and negative from the HPHN mining kernel (triton/hphn_triplet.py: farthest positive
and closest negative in one streaming pass over S, ties to the lowest column, no B×M), then
the loss on those B triplets in PyTorch (any reducer, smooth_loss), as the CPU path's
batch_hard_impl. The picks are made in cosine space, which orders pairs as the miner's
distance does when that is the cosine or the L2 distance of normalised rows (d = √(2 − 2s)
falls as s grows); PML drops anchors without a positive or a negative, and so does this."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import fused
from ..distances import LpDistance, is_cosine, is_normalized_l2
from ..fused.triplet_margin import _miner_distance, _units
from ..fused.triplet_margin import miner_supports as cpu_miner_supports
from ..reducers import reduce_loss_dict, zero_loss
from ..reference.expansion_points import safe_sqrt
from .hphn_triplet import hphn_mine_triton
from .launch import usable_on
from .pairs import max_dim


def miner_supports(params, inp, miner) -> bool:
    x = inp.embeddings
    if type(miner).__name__ != "BatchHardMiner" or not cpu_miner_supports(params, inp, miner):
        return False
    mdist = _miner_distance(miner, LpDistance)
    return ((is_cosine(mdist) or is_normalized_l2(mdist)) and x.shape[1] <= max_dim(x.dtype)
            and usable_on(x.device))


def miner_impl(params, inp, reducer, miner):
    x, dist = inp.embeddings, inp.distance
    xu, ru = _units(inp)
    picks = hphn_mine_triton(xu, ru, inp.labels, inp.ref_labels, inp.same_set)
    a = torch.nonzero((picks[:, 0] >= 0) & (picks[:, 1] >= 0)).squeeze(1)
    if len(a) == 0:  # PML: no triplet, a zero that keeps the graph
        return zero_loss(x)
    p, n = picks[a, 0], picks[a, 1]
    if dist.is_inverted:
        ap, an = (xu[a] * ru[p]).sum(1), (xu[a] * ru[n]).sum(1)
    else:  # the difference, as cdist: exact 0 (and no gradient) for duplicates
        ap = safe_sqrt(((xu[a] - ru[p]) ** 2).sum(1))
        an = safe_sqrt(((xu[a] - ru[n]) ** 2).sum(1))
    violation = dist.margin(ap, an) + params.get("margin", 0.05)
    losses = F.softplus(violation) if params.get("smooth_loss", False) else F.relu(violation)
    return reduce_loss_dict({"loss": {"losses": losses, "indices": (a, p, n),
                                      "reduction_type": "triplet"}}, reducer, x)


fused.register_miner("triton", "TripletMarginLoss", miner_supports, miner_impl)
