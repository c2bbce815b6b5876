"""LiftedStructureLoss through the fused ops: per anchor, the sum and count of its positive
pairs' terms that the reducer keeps (no B×M matrix, no per-pair tensor), then PML's
pos-pair reduction as a ratio of totals, as the contrastive op does.

Covers PML's default LpDistance on normalised embeddings, CosineSimilarity and (CPU
tensors) the L2 of unnormalised rows (the raw rows, whose norms the ops read: the symmetric
op for the batch against itself, the general op against references), with the Mean, Sum,
AvgNonZero and Threshold reducers; any other reducer gets the reference's per-pair losses,
and other distances and indices_tuple go to the reference."""
from __future__ import annotations

import torch

from ..distances import is_dot_of_normalized, is_raw_l2
from ..ops.lifted import lifted_rows, lifted_rows_self
from ..reducers import reduce_loss_dict, zero_loss
from ..spec import get_spec
from ..ops.unit_rows import normalized
from . import generalized_lifted, register
from .contrastive import _reduce_side, _window
from .generalized_lifted import self_pairs_only
from .pair_counts import pair_count_tensors


def supports(params, inp, expansion) -> bool:
    """GeneralizedLifted's scope, less CrossBatchMemory's bank (same_set with the bank's own
    labels: `fused.run_with_memory` rolls the bank, and PML's partner rows are indexed by
    the unrolled bank slots, which the op is not told): that stays on its listing path."""
    return (generalized_lifted.supports(params, inp, expansion)
            and not (inp.same_set and inp.ref_labels is not inp.labels))


def lifted_loss(params, inp, reducer, rows):
    """PML's LiftedStructureLoss from an engine's rows(x_unit, cosine, pos_margin, neg_margin,
    low, high) -> (sums, counts) of the kept terms per anchor (any anchor order): the
    reducer's window, PML's no-loss rules and the pos-pair reduction as a ratio of totals."""
    x = inp.embeddings
    window = _window(reducer)
    if window is None:  # a reducer that is no ratio of totals: the reference's pair losses
        return reduce_loss_dict(get_spec("LiftedStructureLoss").loss_dict(inp, **params), reducer, x)
    n_pos, n_neg = pair_count_tensors(inp.labels, inp.ref_labels, inp.same_set)
    # PML: no loss when no index list has two entries, or when either side is empty; a
    # select, not a branch on the counts (a host sync on a GPU)
    none = (n_pos == 0) | (n_neg == 0) | ((n_pos <= 1) & (n_neg <= 1))
    # the reference's normalisation (its p): a cosine-type similarity of any rows is exact
    xu, cosine = normalized(inp.distance, x), is_dot_of_normalized(inp.distance)
    sums, counts = rows(xu, cosine, params["pos_margin"], params["neg_margin"], *window)
    loss = _reduce_side(sums, counts, n_pos, reducer, x)
    return torch.where(none, zero_loss(x), loss)


def impl(params, inp, reducer, chunk: int = 2048, block: int = 1024):
    def rows(xu, cosine, pm, nm, low, high):
        if self_pairs_only(inp):  # (raw L2: the raw rows, whose norms the op reads)
            return lifted_rows_self(xu, inp.labels, cosine, pm, nm, low, high, block,
                                    raw=is_raw_l2(inp.distance))
        raw = is_raw_l2(inp.distance)  # (the raw rows, whose norms the op reads)
        return lifted_rows(xu, normalized(inp.distance, inp.ref_emb), inp.labels,
                           inp.ref_labels, inp.same_set, cosine, pm, nm, low, high, chunk,
                           raw=raw)
    return lifted_loss(params, inp, reducer, rows)


register("cpu", "LiftedStructureLoss", supports, impl)
