"""ContrastiveLoss through the fused streaming ops: per-anchor sums and counts of the kept
hinge terms (no B×M matrix), then PML's per-sub-loss reduction as ratios of their totals.

The reducers that are such ratios — AvgNonZero and Threshold (mean of the terms inside a
window), Mean, Sum — run here; any other reducer gets the reference's per-pair losses."""
from __future__ import annotations

import torch

from .. import _ext
from ..distances import is_cosine, is_normalized_l2, is_normalized_sq_l2, is_raw_l2, is_squared_l2
from ..reducers import (AvgNonZeroReducer, MeanReducer, SumReducer, ThresholdReducer,
                        reduce_loss_dict, zero_unless)
from ..ops.contrastive import contrastive_rows, contrastive_rows_self
from ..ops.contrastive_metrix import contrastive_metrix_refs_rows, contrastive_metrix_rows
from ..spec import get_spec
from ..ops.unit_rows import unit_rows
from . import register, register_metrix
from .pair_counts import pair_count_tensors
from .raw_l2 import raw_on_cpu
from .multi_similarity import _self_pairs_only, metrix_refs_args, self_block

_WINDOWED = (ThresholdReducer, AvgNonZeroReducer)


def supports(params, inp, expansion) -> bool:
    d = inp.distance
    return (_ext.HAS_EXT and expansion is None and inp.indices_tuple is None
            and inp.labels is not None
            and (is_normalized_l2(d) or is_cosine(d) or is_normalized_sq_l2(d)
                 or raw_on_cpu(inp)))


def op_form(distance, params, window, dtype):
    """(cosine, pos_margin, neg_margin, window, scale): what the ops take for the loss's
    distance, whose terms are scale × the ops' terms. Squared L2 of unit rows (or of raw
    rows, read as s̃ = 1 − d²/2 by the ops told raw, raw_l2.py) is 2 − 2s, so
    [d² − m⁺]₊ = 2·[(1 − m⁺/2) − s]₊ and [m⁻ − d²]₊ = 2·[s − (1 − m⁻/2)]₊: the cosine ops at
    those margins, the reducer's window halved. A positive margin in [0, 16ε) is taken as
    16ε: below it d² is the rounding noise of coincident rows, which PML's cdist and the
    reference's Metrix metric give as exactly 0 (not a term AvgNonZero counts)."""
    pm, nm = params["pos_margin"], params["neg_margin"]
    if not is_squared_l2(distance):
        return is_cosine(distance), pm, nm, window, 1.0
    snap = 16 * torch.finfo(dtype).eps
    pm = snap if 0 <= pm < snap else pm
    low, high = window
    half = lambda v: None if v is None else v / 2  # noqa: E731
    return True, 1 - pm / 2, 1 - nm / 2, (half(low), half(high)), 2.0


def _scaled(rows, scale):
    """(pos_sum, pos_count, neg_sum, neg_count) with the sums times scale"""
    if scale == 1.0:
        return rows
    ps, pc, ns, nc = rows
    return ps * scale, pc, ns * scale, nc


def _window(reducer):
    """(low, high) of the terms the reducer averages; None for a reducer we cannot express."""
    if type(reducer) in _WINDOWED:
        return reducer.low, reducer.high
    if type(reducer) in (MeanReducer, SumReducer):
        return None, None
    return None


def _reduce_side(sums, counts, n_pairs, reducer, x):
    """One side's PML reduction from its row sums and kept counts. Products by the rules' 0/1
    (zero_unless), not Python branches, so the module traces under
    torch.compile(fullgraph=True); n_pairs is a 0-d tensor. PML: a side with no pairs is a
    zero loss whatever the reducer."""
    # the op's sums are finite, and 0 on a side without pairs (zero_unless's condition)
    if type(reducer) is SumReducer:
        val = sums.sum()
    elif type(reducer) is MeanReducer:
        val = sums.sum() / n_pairs.clamp(min=1)
    else:
        val = _avg_kept(sums, counts, x)
    return zero_unless(n_pairs > 0, val)


def _avg_kept(sums, counts, x):
    """The mean of the kept terms from their row sums and counts; a zero loss (with graph)
    when none was kept."""
    kept = counts.sum()
    return zero_unless(kept > 0, sums.sum() / kept.clamp(min=1))


def _reduce_clean(rows, n_pos, n_neg, reducer, x):
    """The clean loss from the rows (pos_sum, pos_count, neg_sum, neg_count): each side
    reduced apart, then summed; PML's rule (no loss when no side has two pairs) as a product."""
    ps, pc, ns, nc = rows
    loss = _reduce_side(ps, pc, n_pos, reducer, x) + _reduce_side(ns, nc, n_neg, reducer, x)
    return zero_unless((n_pos > 1) | (n_neg > 1), loss)


def impl(params, inp, reducer, chunk: int = 2048, block: int = 1024):
    x = inp.embeddings
    window = _window(reducer)
    if window is None:
        # e.g. DivisorReducer (which PML's contrastive cannot feed) or a user subclass; the
        # driver's supports() does not see the reducer, so the fallback is here
        return reduce_loss_dict(get_spec("ContrastiveLoss").loss_dict(inp, **params), reducer, x)
    # PML's rule (no loss when no side has two pairs) is _reduce_clean's select: no host read
    n_pos, n_neg = pair_count_tensors(inp.labels, inp.ref_labels, inp.same_set)
    cosine, pm, nm, (low, high), scale = op_form(inp.distance, params, window, x.dtype)
    raw = is_raw_l2(inp.distance)
    if _self_pairs_only(inp, "contrastive_self_fwd"):
        # the symmetric op: unit rows, or the raw rows (it reads d from their norms and
        # products, contrastive_self_cpu.cpp)
        rows = contrastive_rows_self(x if raw else unit_rows(x), inp.labels, cosine, pm, nm,
                                     low, high, self_block(inp, block), raw=raw)
    else:  # against references: unit rows, or the raw rows (the op reads their norms)
        xo, ro = (x, inp.ref_emb) if raw else (unit_rows(x), unit_rows(inp.ref_emb))
        rows = contrastive_rows(xo, ro, inp.labels, inp.ref_labels, inp.same_set, cosine, pm,
                                nm, low, high, chunk, raw=raw)
    return _reduce_clean(_scaled(rows, scale), n_pos, n_neg, reducer, x)


def metrix_supports(params, inp, expansion, metrix) -> bool:
    """The fused clean + Metrix ops: embedding level, pos_neg or anchor_neg pairs, the batch
    against itself or against references, CPU tensors."""
    return (supports(params, inp, expansion) and metrix.level == "embedding"
            and not is_raw_l2(inp.distance)  # (the mixes' closed forms are of unit rows)
            and metrix.pairs in ("pos_neg", "anchor_neg")
            and inp.embeddings.device.type == "cpu")


def metrix_impl(params, inp, reducer, metrix, lam: float, block: int = 1024):
    """L(clean) + weight · L̃ from one op: the clean rows reduced as `impl` does; the mixed
    term AvgNonZero-reduces its positive and negative terms apart over all candidates of all
    anchors, then sums them (DESIGN §3), whatever the clean loss's reducer."""
    x = inp.embeddings
    window = _window(reducer)
    if window is None:  # a reducer the op cannot express (see impl): the reference, both terms
        from ..reference.metrix import metrix_loss
        clean = reduce_loss_dict(get_spec("ContrastiveLoss").loss_dict(inp, **params), reducer, x)
        return clean + metrix.weight * metrix_loss("ContrastiveLoss", params, inp, metrix, lam)
    xu = unit_rows(x)
    cosine, pm, nm, window, scale = op_form(inp.distance, params, window, x.dtype)
    refs = metrix_refs_args(inp, xu)
    n_pos, n_neg = pair_count_tensors(inp.labels, inp.ref_labels, inp.same_set)
    if refs is not None:  # both terms on the rows of one walk (contrastive_metrix_refs_cpu.cpp)
        clean, mixed = contrastive_metrix_refs_rows(xu, refs[0], inp.labels, refs[1], refs[2],
                                                    cosine, pm, nm, lam, metrix.pairs,
                                                    True, window[0], window[1])
    else:
        clean, mixed = contrastive_metrix_rows(xu, inp.labels, cosine, pm, nm, lam,
                                               metrix.pairs, window[0], window[1], block)
    return (_reduce_clean(_scaled(clean, scale), n_pos, n_neg, reducer, x)
            + metrix.weight * mixed_contrastive(_scaled(mixed, scale), x))


def mixed_contrastive(mixed, x):
    """L̃ from the per-anchor (pos_sum, pos_count, neg_sum, neg_count) of the mixed terms:
    each side AvgNonZero-reduced over all candidates, then summed (DESIGN §3)."""
    return _avg_kept(mixed[0], mixed[1], x) + _avg_kept(mixed[2], mixed[3], x)


register("cpu", "ContrastiveLoss", supports, impl)
register_metrix("cpu", "ContrastiveLoss", metrix_supports, metrix_impl)
