"""TripletMarginLoss (triplets_per_anchor="all") through the fused streaming op: per-anchor
loss sums and triplet counts from triplet_all_fwd, no triplet list, no B×M matrix.

The op returns totals, not per-triplet terms, so only reducers that are functions of the
totals are served here (AvgNonZero, Mean, Sum); any other reducer gets the reference."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _ext
from ..distances import is_cosine, is_normalized_l2
from ..ops.triplet import triplet_all_rows
from ..reducers import (AvgNonZeroReducer, MeanReducer, SumReducer, ThresholdReducer,
                        reduce_loss_dict, zero_loss)
from ..spec import get_spec
from . import register


def supports(params, inp, expansion) -> bool:
    return (_ext.HAS_EXT and expansion is None and inp.indices_tuple is None
            and inp.labels is not None and params.get("triplets_per_anchor", "all") == "all"
            and not params.get("swap", False) and not params.get("smooth_loss", False)
            and (is_cosine(inp.distance) or is_normalized_l2(inp.distance)))


def _divisor_kind(reducer):
    """'nonzero' / 'all' / 'one' for the reducers the totals serve, else None."""
    if type(reducer) is AvgNonZeroReducer or (
            type(reducer) is ThresholdReducer and reducer.low == 0 and reducer.high is None):
        return "nonzero"
    return {MeanReducer: "all", SumReducer: "one"}.get(type(reducer))


def totals_impl(rows_fn, params, inp, reducer):
    """The loss from a backend's per-anchor totals: rows_fn(x_unit, r_unit, labels,
    ref_labels, exclude_diag, cosine, margin) -> (loss sums, #terms > 0, #triplets)."""
    x = inp.embeddings
    kind = _divisor_kind(reducer)
    if kind is None:  # needs the per-triplet terms: the reference has them
        spec = get_spec("TripletMarginLoss")
        return reduce_loss_dict(spec.loss_dict(inp, **params), reducer, x)
    xu = F.normalize(x, dim=1)
    ru = xu if inp.ref_emb is x else F.normalize(inp.ref_emb, dim=1)
    rows, nonzero, triplets = rows_fn(xu, ru, inp.labels, inp.ref_labels, inp.same_set,
                                      is_cosine(inp.distance), params.get("margin", 0.05))
    # counts summed in int64 (they can pass 2**24, past what fp32 holds exactly), then
    # tensor selects rather than Python branches, so the module traces under
    # torch.compile(fullgraph=True)
    n_all = triplets.sum()
    zero = zero_loss(x)
    total = rows.sum()
    if kind == "one":
        loss = total
    else:
        n = nonzero.sum() if kind == "nonzero" else n_all
        loss = torch.where(n > 0, total / n.clamp(min=1), zero)
    # no triplet at all: PML returns a zero that keeps the graph
    return torch.where(n_all == 0, zero, loss)


def impl(params, inp, reducer, chunk: int = 256):
    return totals_impl(lambda *args: triplet_all_rows(*args, chunk), params, inp, reducer)

register("cpu", "TripletMarginLoss", supports, impl)
