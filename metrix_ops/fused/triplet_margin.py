"""TripletMarginLoss (triplets_per_anchor="all") through the fused streaming op: per-anchor
loss sums and triplet counts from triplet_all_fwd, no triplet list, no B×M matrix.

The op returns totals, not per-triplet terms, so only reducers that are functions of the
totals are served here (AvgNonZero, Mean, Sum); any other reducer gets the reference.

The loss option miner= runs inside too (register_miner): TripletMarginMiner through
triplet_mined_fwd (its window of kept triplets counted per row, as the all-triplets op),
BatchHardMiner by streaming row blocks (one triplet per anchor, then the loss on those)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _ext
from ..distances import (LpDistance, as_distance, is_cosine, is_normalized_l2,
                         is_normalized_sq_l2, is_raw_l2, is_squared_l2)
from ..miners.base import record_counts
from ..miners.batch_hard import batch_hard_streaming
from ..miners.row_blocks import BLOCK_ENTRIES
from ..ops.pair_sims import HAS_OP as PAIR_SIMS, pair_sims
from ..ops.triplet import triplet_all_rows
from ..ops.triplet_mined import HAS_OP, MINE_KINDS, triplet_mined_rows
from ..reducers import (AvgNonZeroReducer, MeanReducer, SumReducer, ThresholdReducer,
                        reduce_loss_dict, zero_loss, zero_unless)
from ..spec import get_spec
from ..ops.unit_rows import unit_rows
from . import register, register_miner
from .raw_l2 import raw_at, raw_on_cpu


def supports(params, inp, expansion) -> bool:
    return (_ext.HAS_EXT and expansion is None and inp.indices_tuple is None
            and inp.labels is not None and params.get("triplets_per_anchor", "all") == "all"
            and not params.get("swap", False) and not params.get("smooth_loss", False)
            and op_kind(inp) is not None)


def op_kind(inp, any_device: bool = False):
    """_unit_distance's kinds, plus "raw" / "rawsq" for the L2 / squared L2 of unnormalised
    rows on CPU tensors (raw_l2.raw_on_cpu), or on any device (any_device: the Triton
    engine's own glue)."""
    d = inp.distance
    if is_raw_l2(d):
        ok = raw_at(inp) if any_device else raw_on_cpu(inp)
        return None if not ok else "raw" if d.power == 1 else "rawsq"
    return _unit_distance(d)


def _op_rows(inp, any_device: bool = False):
    """(x, r, cosine, squared) as the all-triplets ops take the call's distance:
    - cosine, L2 of unit rows: the unit rows;
    - squared L2 of unit rows: the same, through the cosine ops (squared: the caller halves
      the margins and doubles the terms, see totals_impl);
    - L2 of raw rows: the rows themselves (the CPU ops read L2 through torch.cdist, whose
      gradient, radial term included, their backward gives; the Triton kernels read it from
      the rows' norms and products, told `raw`);
    - squared L2 of raw rows: the rows themselves through the cosine ops at half the
      margin, which read them as 1 − d²/2 (told `raw_sq` on the CPU, from cdist's d; `raw`
      on Triton, from the rows' norms and products)."""
    kind, x, ref = op_kind(inp, any_device), inp.embeddings, inp.ref_emb
    if kind == "raw":
        return x, ref, False, False
    if kind == "rawsq":
        return x, ref, True, True
    xu = unit_rows(x)
    ru = xu if ref is x else unit_rows(ref)
    return xu, ru, kind != "l2", kind == "l2sq"


def unit_distance(d) -> bool:
    """The distances the all-triplets ops serve: cosine and L2 of unit rows, and squared L2
    through the cosine ops (totals_impl)."""
    return _unit_distance(d) is not None


def _divisor_kind(reducer):
    """'nonzero' / 'all' / 'one' for the reducers the totals serve, else None."""
    if type(reducer) is AvgNonZeroReducer or (
            type(reducer) is ThresholdReducer and reducer.low == 0 and reducer.high is None):
        return "nonzero"
    return {MeanReducer: "all", SumReducer: "one"}.get(type(reducer))


def totals_impl(rows_fn, params, inp, reducer, fallback=None, miner=None,
                any_device: bool = False):
    """The loss from a backend's per-anchor totals: rows_fn(x_unit, r_unit, labels,
    ref_labels, exclude_diag, cosine, margin) -> (loss sums, #terms > 0, #triplets).
    A reducer that needs the per-triplet terms gets fallback() (default: the reference).
    A miner whose rule the rows ran gets its count of triplets. any_device: op_kind's."""
    x = inp.embeddings
    kind = _divisor_kind(reducer)
    if kind is None:  # needs the per-triplet terms: the reference has them
        if fallback is not None:
            return fallback()
        spec = get_spec("TripletMarginLoss")
        return reduce_loss_dict(spec.loss_dict(inp, **params), reducer, x)
    xo, ro, cosine, sq = _op_rows(inp, any_device)
    margin = params.get("margin", 0.05)
    # squared L2 of unit rows is 2 − 2s (of raw rows, 2 − 2s̃ with s̃ = 1 − d²/2, which the
    # ops read told raw_sq / raw): a triplet's term [d²_ap − d²_an + m]₊ is
    # 2·[s_an − s_ap + m/2]₊, the cosine op's term at half the margin (the same terms > 0)
    rows, nonzero, triplets = rows_fn(xo, ro, inp.labels, inp.ref_labels, inp.same_set,
                                      cosine, margin / 2 if sq else margin)
    if sq:
        rows = rows * 2
    # counts summed in int64 (they can pass 2**24, past what fp32 holds exactly), then
    # tensor selects rather than Python branches, so the module traces under
    # torch.compile(fullgraph=True)
    n_all = triplets.sum()
    if miner is not None:
        record_counts(miner, triplets=n_all)
    # the totals are 0 without triplets (zero_unless's condition)
    total = rows.sum()
    if kind == "one":
        loss = total
    else:
        n = nonzero.sum() if kind == "nonzero" else n_all
        loss = zero_unless(n > 0, total / n.clamp(min=1))
    # no triplet at all: PML returns a zero that keeps the graph
    return zero_unless(n_all > 0, loss)


def impl(params, inp, reducer, chunk: int = 256):
    raw_sq = op_kind(inp) == "rawsq"
    return totals_impl(lambda *args: triplet_all_rows(*args, chunk, raw_sq), params, inp,
                       reducer)


def _unit_distance(d):
    """'cosine' / 'l2' / 'l2sq' for the distances the ops compute (of unit rows), else None."""
    return ("cosine" if is_cosine(d) else "l2" if is_normalized_l2(d)
            else "l2sq" if is_normalized_sq_l2(d) else None)


def _miner_distance(miner, default):
    try:
        return as_distance(getattr(miner, "distance", None), default)
    except (TypeError, ValueError):  # a distance we do not know
        return None


def miner_fits(params, inp, miner, any_device: bool = False) -> bool:
    """TripletMarginMiner on the loss's own distance, or BatchHardMiner on any distance,
    with the loss on cosine or normalised L2, no swap: the calls an engine's ops can mine
    inside. PML's miners and ours alike; the self pair is dropped by labels identity in both
    miners and the loss, as inp.same_set."""
    kind = type(miner).__name__
    if inp.labels is None or params.get("swap", False) or op_kind(inp, any_device) is None:
        return False
    mdist = _miner_distance(miner, LpDistance)
    if kind == "BatchHardMiner":
        # PML's BatchHardMiner passes allowed_pos/neg_range on to BatchEasyHardMiner
        return (mdist is not None
                and getattr(miner, "allowed_pos_range", None) is None
                and getattr(miner, "allowed_neg_range", None) is None)
    if kind == "TripletMarginMiner":
        # squared L2 runs the cosine op at half the margins, its terms doubled (totals_impl):
        # true of hinges, not of smooth_loss's softplus
        return (getattr(miner, "type_of_triplets", None) in MINE_KINDS and mdist is not None
                and _same_kind(mdist, inp.distance)
                and not (is_squared_l2(inp.distance) and params.get("smooth_loss", False)))
    return False


def _same_kind(a, b) -> bool:
    """Whether two distances compute the same matrix, of those the ops take."""
    if is_raw_l2(a) or is_raw_l2(b):
        return is_raw_l2(a) and is_raw_l2(b) and a.power == b.power
    return _unit_distance(a) is not None and _unit_distance(a) == _unit_distance(b)


def miner_supports(params, inp, miner) -> bool:
    """miner_fits, TripletMarginMiner through the C++ op (smooth_loss is served)."""
    return miner_fits(params, inp, miner) and (
        type(miner).__name__ != "TripletMarginMiner" or HAS_OP)


def _units(inp):
    xu = unit_rows(inp.embeddings)
    return xu, (xu if inp.ref_emb is inp.embeddings else unit_rows(inp.ref_emb))


def _mined_by_tuple(params, inp, reducer, miner):
    """PML's two calls: the miner's index tuple, then the reference loss on it."""
    tup = miner(inp.embeddings, inp.labels, inp.ref_emb, inp.ref_labels)
    inp = inp.with_indices(tup)
    spec = get_spec("TripletMarginLoss")
    return reduce_loss_dict(spec.loss_dict(inp, **params), reducer, inp.embeddings)


def _with_exact_grad(value, xu, ru, a, j, cosine: bool, squared: bool = False):
    """The loss distance's value at pairs (a, j), read off its full matrix's entries
    (`value`, no graph), with the gradient of that distance in S = X Rᵀ: ds for cosine,
    −2 ds for squared L2 (2 − 2s), −ds/d for the L2 distance of unit rows (0 at d = 0, as
    torch's cdist backward). The value stays bit-exact: the added term is exactly 0."""
    if xu.device.type == "cpu" and PAIR_SIMS:
        # the listed pairs' dots read in place (pair_sims_cpu.cpp): no gathered B×D rows
        s = pair_sims(xu, ru, a, j)
    else:
        # index_select, not xu[a]: its backward is an index_add, where advanced indexing's
        # is a serial index_put with accumulation
        s = (xu.index_select(0, a) * ru.index_select(0, j)).sum(1)
    ds = s - s.detach()
    if cosine:
        return value + ds
    if squared:
        return value - 2 * ds
    tiny = torch.finfo(value.dtype).tiny
    return value + ds * torch.where(value > 0, -1 / value.clamp(min=tiny), 0.0)


def _raw_with_exact_grad(value, x, r, a, j, squared: bool):
    """As _with_exact_grad for the L2 (or squared L2) of raw rows: the value as its full
    matrix holds it, the gradient of ‖x_a − r_j‖ ((x_a − r_j)/d, 0 at d = 0 as torch's cdist
    backward) or of its square (2·(x_a − r_j)), from the B listed differences."""
    diff = x.index_select(0, a) - r.index_select(0, j)
    dd = (diff.detach() * (diff - diff.detach())).sum(1)  # value 0, gradient diff
    if squared:
        return value + 2 * dd
    tiny = torch.finfo(value.dtype).tiny
    return value + dd * torch.where(value > 0, 1 / value.clamp(min=tiny), 0.0)


def batch_hard_impl(params, inp, reducer, miner):
    """BatchHardMiner + TripletMarginLoss: each anchor's hardest positive and negative by
    the miner's distance in one pass over row blocks (no B×M), then the loss on those B
    triplets in PyTorch (any reducer, smooth_loss) with the loss distance's exact values."""
    x, dist = inp.embeddings, inp.distance
    a, p, n, vp, vn = batch_hard_streaming(
        _miner_distance(miner, LpDistance), x, inp.ref_emb, inp.labels, inp.ref_labels,
        inp.same_set, value_distance=dist,
        entries=getattr(miner, "block_entries", BLOCK_ENTRIES))
    record_counts(miner, triplets=len(a))
    if len(a) == 0:  # PML: no triplet, a zero that keeps the graph
        return zero_loss(x)
    if is_raw_l2(dist):
        ap = _raw_with_exact_grad(vp, x, inp.ref_emb, a, p, dist.power == 2)
        an = _raw_with_exact_grad(vn, x, inp.ref_emb, a, n, dist.power == 2)
    else:
        xu, ru = _units(inp)
        cosine, squared = is_cosine(dist), is_normalized_sq_l2(dist)
        ap = _with_exact_grad(vp, xu, ru, a, p, cosine, squared)
        an = _with_exact_grad(vn, xu, ru, a, n, cosine, squared)
    violation = dist.margin(ap, an) + params.get("margin", 0.05)
    losses = F.softplus(violation) if params.get("smooth_loss", False) else F.relu(violation)
    return reduce_loss_dict({"loss": {"losses": losses, "indices": (a, p, n),
                                      "reduction_type": "triplet"}}, reducer, x)


def miner_margin(miner, inp) -> float:
    """TripletMarginMiner's margin in the units of the op's gap: halved for squared L2, whose
    gap d²_an − d²_ap is twice the cosine op's s_ap − s_an (miner_fits: the miner and the
    loss share the distance)."""
    return float(miner.margin) / (2 if is_squared_l2(inp.distance) else 1)


def triplet_miner_impl(params, inp, reducer, miner, chunk: int = 256):
    """TripletMarginMiner + TripletMarginLoss: per-anchor totals over the kept triplets from
    triplet_mined_fwd (hinge or, with smooth_loss, softplus terms); a reducer needing
    per-triplet terms takes the miner's tuple."""
    mm, raw_sq = miner_margin(miner, inp), op_kind(inp) == "rawsq"

    def rows_fn(xu, ru, labels, ref_labels, exclude_diag, cosine, margin):
        return triplet_mined_rows(xu, ru, labels, ref_labels, exclude_diag, cosine, margin,
                                  miner.type_of_triplets, mm,
                                  params.get("smooth_loss", False), chunk, raw_sq)
    return totals_impl(rows_fn, params, inp, reducer,
                       fallback=lambda: _mined_by_tuple(params, inp, reducer, miner), miner=miner)


def miner_impl(params, inp, reducer, miner):
    if type(miner).__name__ == "BatchHardMiner":
        return batch_hard_impl(params, inp, reducer, miner)
    return triplet_miner_impl(params, inp, reducer, miner)


register("cpu", "TripletMarginLoss", supports, impl)
register_miner("cpu", "TripletMarginLoss", miner_supports, miner_impl)
