"""NTXentLoss and SupConLoss through the fused streaming ops (no B×M matrix).

NT-Xent is reduced per positive pair: the op gives each anchor's sum and count of its pair
losses inside the reducer's window, and Mean, Sum, AvgNonZero and Threshold are ratios of
their totals (as fused/contrastive.py); any other reducer gets the reference. SupCon gives
one loss per anchor, so every reducer applies to the op's rows as in the reference.
Covers the default cosine similarity, no indices_tuple; else "auto" runs the reference."""
from __future__ import annotations

import torch

from .. import _ext
from ..distances import is_cosine
from ..ops.ntxent import ntxent_rows, ntxent_rows_self, supcon_rows, supcon_rows_self
from ..reducers import reduce_loss_dict, zero_loss
from ..spec import get_spec
from ..ops.unit_rows import unit_rows
from . import register
from .contrastive import _reduce_side, _window
from .multi_similarity import _self_pairs_only as self_pairs_only, self_block
from .pair_counts import pair_count_tensors


def supports(params, inp, expansion) -> bool:
    return (_ext.HAS_EXT and expansion is None and inp.indices_tuple is None
            and inp.labels is not None and is_cosine(inp.distance))


def unit_pair(inp):
    """The unit anchors and references; the batch against itself is one tensor."""
    xu = unit_rows(inp.embeddings)
    return xu, (xu if inp.ref_emb is inp.embeddings else unit_rows(inp.ref_emb))


def guarded(compute, inp, need_both: bool):
    """compute(n_pos), or the zero loss under PML's "no pairs, no loss" rules: every pair
    list with at most one entry (GenericPairLoss); with need_both, also no positive or no
    negative pair at all. A select, never a branch on the counts: no host sync on a GPU and
    no data-dependent branch under torch.compile (the op runs on such a batch too, finite)."""
    x = inp.embeddings
    pos, neg = pair_count_tensors(inp.labels, inp.ref_labels, inp.same_set)
    empty = (pos <= 1) & (neg <= 1)
    if need_both:
        empty = empty | (pos == 0) | (neg == 0)
    return torch.where(empty, zero_loss(x), compute(pos))


def reduce_rows(rows, reducer, x):
    """Per-anchor losses ("element" reduction) through the reducer, as the reference. Mean,
    Sum, AvgNonZero and Threshold as masked totals (no data-dependent shapes, so the module
    traces under torch.compile(fullgraph=True)); any other reducer as the reference does."""
    window = _window(reducer)
    if window is None:
        loss_dict = {"loss": {"losses": rows, "indices": torch.arange(len(rows), device=x.device),
                              "reduction_type": "element"}}
        return reduce_loss_dict(loss_dict, reducer, x)
    low, high = window
    kept = torch.ones_like(rows, dtype=torch.bool)
    if low is not None:
        kept = kept & (rows > low)
    if high is not None:
        kept = kept & (rows < high)
    n_rows = torch.tensor(rows.shape[0], device=rows.device)
    return _reduce_side(torch.where(kept, rows, 0), kept, n_rows, reducer, x)


def ntxent_from_rows(rows_fn, params, inp, reducer):
    """NTXentLoss from a backend's per-anchor totals: rows_fn(x_unit, r_unit, labels,
    ref_labels, same_set, temperature, low, high) -> (sum, count) of each anchor's positive-
    pair losses inside the reducer's window; PML's no-pairs rules and reduction here."""
    x = inp.embeddings
    window = _window(reducer)
    if window is None:  # a reducer that is not a ratio of totals (DivisorReducer, a subclass)
        return reduce_loss_dict(get_spec("NTXentLoss").loss_dict(inp, **params), reducer, x)

    def compute(n_pos):
        xu, ru = unit_pair(inp)
        sums, counts = rows_fn(xu, ru, inp.labels, inp.ref_labels, inp.same_set,
                               params["temperature"], *window)
        return _reduce_side(sums, counts, n_pos, reducer, x)

    return guarded(compute, inp, need_both=True)


def supcon_from_rows(rows_fn, params, inp, reducer):
    """SupConLoss from a backend's per-anchor losses: rows_fn(x_unit, r_unit, labels,
    ref_labels, same_set, temperature) -> rows."""
    def compute(_n_pos):
        xu, ru = unit_pair(inp)
        rows = rows_fn(xu, ru, inp.labels, inp.ref_labels, inp.same_set, params["temperature"])
        return reduce_rows(rows, reducer, inp.embeddings)

    return guarded(compute, inp, need_both=True)


SELF_BLOCK = 1024  # rows per block of the batch against itself (tests set it small)


def ntxent_impl(params, inp, reducer, chunk=None):
    def rows(xu, ru, labels, ref_labels, same_set, temperature, low, high):
        if self_pairs_only(inp, "ntxent_self_fwd"):  # S symmetric: half the products
            return ntxent_rows_self(xu, labels, temperature, low, high,
                                    self_block(inp, SELF_BLOCK))
        return ntxent_rows(xu, ru, labels, ref_labels, same_set, temperature, low, high, chunk)

    return ntxent_from_rows(rows, params, inp, reducer)


def supcon_impl(params, inp, reducer, chunk=None):
    def rows(xu, ru, labels, ref_labels, same_set, temperature):
        if self_pairs_only(inp, "supcon_self_fwd"):  # S symmetric: half the products
            return supcon_rows_self(xu, labels, temperature, self_block(inp, SELF_BLOCK))
        return supcon_rows(xu, ru, labels, ref_labels, same_set, temperature, chunk)

    return supcon_from_rows(rows, params, inp, reducer)


register("cpu", "NTXentLoss", supports, ntxent_impl)
register("cpu", "SupConLoss", supports, supcon_impl)
