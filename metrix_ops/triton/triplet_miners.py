"""TripletMarginLoss with a miner as a loss option (`miner=`) on the Triton engine, as the
CPU path does it (fused/triplet_margin.py):

- BatchHardMiner: each anchor's hardest positive and negative from the HPHN mining kernel
  (triton/hphn_triplet.py: farthest positive and closest negative in one streaming pass
  over S, ties to the lowest column, no B×M), then the loss on those B triplets in PyTorch
  (any reducer, smooth_loss). The picks are made by a product that orders pairs as the
  miner's distance does: of unit rows for the cosine or the L2 distance of normalised rows
  (d = √(2 − 2s) falls as s grows), of the raw rows read as 1 − d²/2 for the L2 of raw
  rows (the kernel's RAW form, tiles.raw_unit_sims); PML drops anchors without a positive or
  a negative, and so does this. The loss's distance at the B picks comes from the rows'
  differences (raw rows for the L2 of raw rows).
- TripletMarginMiner (all, hard, semihard, easy) on the loss's own distance: the "all"
  triplets kernels of triton/triplet_margin.py with the miner's window on each triplet's gap
  (MINE; raw rows too, both powers, as that module), per-anchor totals over the kept triplets; a
  reducer needing per-triplet terms (and smooth_loss) takes the miner's index tuple."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import fused
from ..distances import LpDistance, is_cosine, is_normalized_l2, is_normalized_sq_l2, is_raw_l2
from ..fused.triplet_margin import (_mined_by_tuple, _miner_distance, _units, miner_fits,
                                    miner_margin, op_kind, totals_impl)
from ..miners.base import record_counts
from ..reducers import reduce_loss_dict, zero_loss
from ..reference.expansion_points import safe_sqrt
from .hphn_triplet import hphn_mine_triton
from .launch import usable_on
from .pairs import max_dim
from .triplet_margin import triplet_mined_rows_triton


def miner_supports(params, inp, miner) -> bool:
    """The CPU path's calls (fused/triplet_margin.miner_fits), less two: BatchHardMiner only
    on a distance ordered as a product (cosine, the L2 of unit rows, or the L2 of raw rows
    read as 1 − d²/2), and TripletMarginMiner without smooth_loss (the "all" kernels sum
    hinge terms)."""
    x = inp.embeddings
    if not (x.shape[1] <= max_dim(x.dtype) and usable_on(x.device, x.dtype)
            and miner_fits(params, inp, miner, any_device=True)):
        return False
    if type(miner).__name__ == "BatchHardMiner":
        mdist = _miner_distance(miner, LpDistance)
        return (is_cosine(mdist) or is_normalized_l2(mdist) or is_normalized_sq_l2(mdist)
                or is_raw_l2(mdist))
    return not params.get("smooth_loss", False)


def triplet_miner_impl(params, inp, reducer, miner):
    """Per-anchor totals over the triplets TripletMarginMiner keeps; a reducer needing the
    per-triplet terms takes the miner's tuple."""
    mm = miner_margin(miner, inp)
    raw = op_kind(inp, any_device=True) in ("raw", "rawsq")

    def rows_fn(xu, ru, labels, ref_labels, exclude_diag, cosine, margin):
        return triplet_mined_rows_triton(xu, ru, labels, ref_labels, exclude_diag, cosine,
                                         margin, miner.type_of_triplets, mm, raw)
    return totals_impl(rows_fn, params, inp, reducer,
                       fallback=lambda: _mined_by_tuple(params, inp, reducer, miner), miner=miner,
                       any_device=True)


def _pick_rows(inp, mdist):
    """(x, r, raw): the rows whose products order pairs as the miner's distance: unit rows
    (cosine, L2 of unit rows: d falls as s grows), or the raw rows, which the mining kernel
    reads as 1 − d²/2 (raw)."""
    if is_raw_l2(mdist):
        return inp.embeddings, inp.ref_emb, True
    return (*_units(inp), False)


def _pair_values(dist, x, r, a, j):
    """The loss distance at pairs (a, j) of rows x, r (unit rows, or raw rows for the L2 of
    raw rows), with its gradient: the product for cosine, else from the difference, as
    cdist: exact 0 (and no gradient) for duplicates."""
    if dist.is_inverted:
        return (x[a] * r[j]).sum(1)
    sq = ((x[a] - r[j]) ** 2).sum(1)
    return sq if dist.power == 2 else safe_sqrt(sq)


def batch_hard_impl(params, inp, reducer, miner):
    x, dist = inp.embeddings, inp.distance
    xp, rp, raw = _pick_rows(inp, _miner_distance(miner, LpDistance))
    picks = hphn_mine_triton(xp, rp, inp.labels, inp.ref_labels, inp.same_set, raw)
    a = torch.nonzero((picks[:, 0] >= 0) & (picks[:, 1] >= 0)).squeeze(1)
    record_counts(miner, triplets=len(a))
    if len(a) == 0:  # PML: no triplet, a zero that keeps the graph
        return zero_loss(x)
    p, n = picks[a, 0], picks[a, 1]
    xv, rv = (x, inp.ref_emb) if is_raw_l2(dist) else _units(inp)
    ap, an = _pair_values(dist, xv, rv, a, p), _pair_values(dist, xv, rv, a, n)
    violation = dist.margin(ap, an) + params.get("margin", 0.05)
    losses = F.softplus(violation) if params.get("smooth_loss", False) else F.relu(violation)
    return reduce_loss_dict({"loss": {"losses": losses, "indices": (a, p, n),
                                      "reduction_type": "triplet"}}, reducer, x)


def miner_impl(params, inp, reducer, miner):
    if type(miner).__name__ == "BatchHardMiner":
        return batch_hard_impl(params, inp, reducer, miner)
    return triplet_miner_impl(params, inp, reducer, miner)


fused.register_miner("triton", "TripletMarginLoss", miner_supports, miner_impl)
