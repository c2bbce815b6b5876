"""MultiSimilarityLoss, LiftedStructureLoss, GeneralizedLiftedStructureLoss, NPairsLoss and
TripletMarginLoss with Embedding Expansion on the CPU (and, with the Triton ops, on that
engine; the CUDA engine's ops have the CPU ops' schemas, fused/cuda_ee_losses.py). The negative
side, a term for every (anchor, original or synthetic
negative point) pair scored by its closest pair, comes from a fused op (no B×P matrix, no
point stack): ee_neg_lse's per-anchor log-sum-exp, or ee_triplet's per-anchor totals over
(positive, negative point). The clean side (original positive pairs, O(Σ_c |c|²) of them)
is gathered here in PyTorch. MS, lifted and N-pair build the reference's loss dict
(reference/expansion.py) from these and reduce it the same way, so every reducer applies;
triplet has totals only, so it serves the reducers that are functions of them and hands the
others to the reference."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _ext
from ..distances import CosineSimilarity, DotProductSimilarity, is_normalized_l2
from ..ops.ee_losses import ee_neg_lse, ee_triplet
from ..ops.ee_mining import all_segments
from ..reducers import reduce_loss_dict, zero_loss
from ..reference.expansion import expansion_loss_dict
from ..reference.expansion_points import expansion_segments, safe_sqrt
from ..ops.unit_rows import normalized
from . import register_expansion
from .npairs import first_pairs  # (PML's pairs, as the clean op takes them)
from .pair_counts import pair_count_tensors
from .triplet_margin import _divisor_kind

CHUNK = 256  # rows per class chunk of the op; tests set it small


def _cosine_like(d) -> bool:
    """The dot product of L2-normalised rows (NPairs' default DotProductSimilarity normalises)."""
    return (type(d) in (CosineSimilarity, DotProductSimilarity) and d.normalize_embeddings
            and d.p == 2 and d.power == 1)


def fits(inp, expansion) -> bool:
    """The call is one this glue computes, on any engine: EE on the batch against itself, no
    indices_tuple, a cosine-like similarity or the L2 distance of normalised points."""
    d = inp.distance
    if not (expansion is not None and inp.indices_tuple is None and inp.labels is not None
            and inp.same_set and inp.ref_emb is inp.embeddings):
        return False
    if _cosine_like(d):
        return True
    # L2 between unnormalised mixes is not a function of their cosine: the reference only
    return is_normalized_l2(d) and (expansion.normalize or expansion.n_points == 0)


def supports(params, inp, expansion) -> bool:
    return _ext.HAS_EXT and inp.embeddings.device.type == "cpu" and fits(inp, expansion)


def _segments(labels, expansion):
    """The segments, as the reference builds them; "adjacent" is validated (and raises as the
    reference does) even with n_points = 0, where the op ignores them."""
    if expansion.pairs != "all":
        return expansion_segments(labels, expansion.pairs)  # O(B)
    if expansion.n_points == 0:
        return labels.new_empty(0), labels.new_empty(0)
    return all_segments(labels)  # O(#pairs), no B×B mask


def _neg_lse(inp, expansion, segs, scale, offset, anchor_mask=None, neg_mask=None,
             lse_fn=None):
    """log Σ_{Q_i} exp(scale·m̂ + offset) per anchor, m̂ = ŝ or d̂ as the distance is: by the
    CPU op, or by an engine's op of the same signature (lse_fn, e.g. the Triton one)."""
    x, labels = inp.embeddings, inp.labels
    seg_i, seg_j = segs
    xu = normalized(inp.distance, x)
    l2 = not inp.distance.is_inverted
    if lse_fn is not None:
        return lse_fn(xu, labels, seg_i, seg_j, expansion.n_points, l2, scale, offset,
                      anchor_mask, neg_mask)
    return ee_neg_lse(xu, labels, seg_i, seg_j, expansion.n_points, l2, scale, offset,
                      anchor_mask, neg_mask, CHUNK)


def _pair_metric(inp, a, p):
    """The loss metric between originals a and p (the clean distance), with gradient;
    positives' differences are exact for duplicate rows, as cdist's."""
    xu = normalized(inp.distance, inp.embeddings)
    if inp.distance.is_inverted:
        return (xu.index_select(0, a) * xu.index_select(0, p)).sum(1)
    return safe_sqrt(((xu.index_select(0, a) - xu.index_select(0, p)) ** 2).sum(1))


def _positive_pairs(labels, expansion=None, segs=None):
    """Every ordered positive pair (a, p), a ≠ p, sorted as torch.where(pos) gives them;
    from the call's segments when they are every positive pair (pairs="all", n > 0), as
    building them again costs host syncs (their count sizes them)."""
    every = expansion is not None and expansion.pairs == "all" and expansion.n_points > 0
    i, j = segs if every else all_segments(labels)
    a, p = torch.cat([i, j]), torch.cat([j, i])
    keep = torch.argsort(a * len(labels) + p)
    return a[keep], p[keep]


def _reduce(losses, indices, kind, reducer, x):
    return reduce_loss_dict({"loss": {"losses": losses, "indices": indices,
                                      "reduction_type": kind}}, reducer, x)


def _log1p_sum_exp(v, idx, b):
    """log(1 + Σ_{idx = i} e^v) per i in [0, b) (scatter form, stable)."""
    m = v.new_zeros(b).scatter_reduce(0, idx, v.detach(), "amax", include_self=True)
    return m + torch.log(torch.exp(-m).index_add(0, idx, torch.exp(v - m[idx])))


def multi_similarity(params, inp, reducer, expansion=None, lse_fn=None):
    x, labels, d = inp.embeddings, inp.labels, inp.distance
    alpha, beta, base = params.get("alpha", 2.0), params.get("beta", 50.0), params.get("base", 0.5)
    segs = _segments(labels, expansion)  # first: a bad "adjacent" batch raises as the reference
    b = len(labels)
    if b < 2:
        # no negative and no positive: PML's 0 (the reference's empty loss dict); a single
        # class of two or more still has its positive terms
        return zero_loss(x)
    a, p = _positive_pairs(labels, expansion, segs)
    pos = _log1p_sum_exp(alpha * d.margin(_pair_metric(inp, a, p), base), a, b) / alpha
    # β·margin(base, m̂): β(ŝ − base) for a similarity, β(base − d̂) for a distance
    sign = 1.0 if d.is_inverted else -1.0
    lse = _neg_lse(inp, expansion, segs, sign * beta, -sign * beta * base, lse_fn=lse_fn)
    neg = torch.logaddexp(lse, torch.zeros_like(lse)) / beta
    return _reduce(pos + neg, torch.arange(b, device=x.device), "element", reducer, x)


def lifted_structure(params, inp, reducer, expansion=None, lse_fn=None):
    x, labels, d = inp.embeddings, inp.labels, inp.distance
    neg_margin, pos_margin = params.get("neg_margin", 1.0), params.get("pos_margin", 0.0)
    segs = _segments(labels, expansion)  # first: a bad "adjacent" batch raises as the reference
    if len(labels) < 2:
        # one row has no pair: PML's zero loss, by the shape (static under torch.compile).
        # torch 2.6's Inductor cannot vectorise the backward's scatter into a one-row
        # gradient (an assertion in its C++ codegen) that the select below would compile
        return zero_loss(x)
    a, p = _positive_pairs(labels, expansion, segs)
    # PML: no loss without a positive or a negative pair (the reference's empty dict); a
    # select, not a branch on the counts (a host sync on a GPU; as fused/lifted_structure.py)
    n_pos, n_neg = pair_count_tensors(labels, labels, True)
    none = (n_pos == 0) | (n_neg == 0)
    # margin(neg_margin, m̂): ŝ − m for a similarity, m − d̂ for a distance
    sign = 1.0 if d.is_inverted else -1.0
    lse = _neg_lse(inp, expansion, segs, sign, -sign * neg_margin, lse_fn=lse_fn)
    both = torch.logaddexp(lse[a], lse[p])  # the negatives of both ends of the pair
    losses = F.relu(both + d.margin(_pair_metric(inp, a, p), pos_margin)) ** 2 / 2
    loss = _reduce(losses, (a, p), "pos_pair", reducer, x)
    return torch.where(none, zero_loss(x), loss)


def _masked_lse(v, idx, b):
    """log Σ_{idx = i} e^v per i in [0, b), 0 where i has no term (PML's masked form)."""
    m = v.new_zeros(b).scatter_reduce(0, idx, v.detach(), "amax", include_self=False)
    total = v.new_zeros(b).index_add(0, idx, torch.exp(v - m[idx]))
    has = torch.zeros(b, dtype=torch.bool, device=v.device).index_fill(0, idx, True)
    return torch.where(has, m + torch.log(torch.where(has, total, torch.ones_like(total))),
                       torch.zeros_like(total))


def generalized_lifted(params, inp, reducer, expansion=None, lse_fn=None):
    x, labels, d = inp.embeddings, inp.labels, inp.distance
    neg_margin, pos_margin = params.get("neg_margin", 1.0), params.get("pos_margin", 0.0)
    segs = _segments(labels, expansion)  # first: a bad "adjacent" batch raises as the reference
    b = len(labels)
    if b < 2:
        return zero_loss(x)  # PML: no positive and no negative pair (the reference's dict)
    a, p = _positive_pairs(labels, expansion, segs)
    pos = _masked_lse(d.margin(_pair_metric(inp, a, p), pos_margin), a, b)
    # margin(neg_margin, m̂): ŝ − m for a similarity, m − d̂ for a distance; an anchor with
    # no negative point gets −inf from the op, and its side adds 0 (PML's masked form)
    sign = 1.0 if d.is_inverted else -1.0
    lse = _neg_lse(inp, expansion, segs, sign, -sign * neg_margin, lse_fn=lse_fn)
    neg = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return _reduce(F.relu(pos + neg), torch.arange(b, device=x.device), "element", reducer, x)


def npairs(params, inp, reducer, expansion=None, lse_fn=None):
    x, labels, d = inp.embeddings, inp.labels, inp.distance
    segs = _segments(labels, expansion)  # first: a bad "adjacent" batch raises as the reference
    a, p = first_pairs(labels)
    compiling = torch.compiler.is_compiling()
    if not compiling and len(a) == 0:
        return zero_loss(x)  # the reference's empty loss dict reduces to this
    b = len(labels)
    sign = 1.0 if d.is_inverted else -1.0  # logits: similarities, or −distances
    anchors = torch.zeros(b, dtype=torch.bool, device=x.device).index_fill(0, a, True)
    # negatives: the other pairs' positives (originals) and every synthetic point of another
    # class, each scored by its closest pair; the target is the plain s(a_k, p_k)
    negs = torch.zeros(b, dtype=torch.bool, device=x.device).index_fill(0, p, True)
    lse = _neg_lse(inp, expansion, segs, sign, 0.0, anchors, negs, lse_fn)[a]
    target = sign * _pair_metric(inp, a, p)
    loss = _reduce(torch.logaddexp(lse, target) - target, a, "element", reducer, x)
    if compiling:  # no pair: the select form of the branch above
        n_pos, _ = pair_count_tensors(labels, labels, True)
        return torch.where(n_pos == 0, zero_loss(x), loss)
    return loss


def triplet_fits(params, inp, expansion) -> bool:
    """"all" triplets without swap: the reference's only EE form of the loss."""
    return (fits(inp, expansion) and not params.get("swap", False)
            and params.get("triplets_per_anchor", "all") == "all")


def triplet_supports(params, inp, expansion) -> bool:
    return supports(params, inp, expansion) and triplet_fits(params, inp, expansion)


def _triplet_cpu(xu, labels, seg_i, seg_j, pos, n, l2, margin, smooth):
    return ee_triplet(xu, labels, seg_i, seg_j, pos, n, l2, margin, smooth, CHUNK)


def triplet_margin(params, inp, reducer, expansion=None, trip_fn=None):
    """trip_fn: an engine's op of ee_triplet's signature (without chunk), e.g. the Triton one;
    the CPU op by default."""
    x, labels, d = inp.embeddings, inp.labels, inp.distance
    seg_i, seg_j = _segments(labels, expansion)  # first: a bad "adjacent" batch raises
    kind = _divisor_kind(reducer)
    if kind is None:  # the reducer needs the per-triplet terms: the reference has them
        return reduce_loss_dict(expansion_loss_dict("TripletMarginLoss", params, inp, expansion),
                                reducer, x)
    a, p = _positive_pairs(labels, expansion, (seg_i, seg_j))  # anchor-major, as the op reads
    sums, nonzero, triplets = (trip_fn or _triplet_cpu)(
        normalized(d, x), labels, seg_i, seg_j, _pair_metric(inp, a, p),
        expansion.n_points, not d.is_inverted, params.get("margin", 0.05),
        params.get("smooth_loss", False))
    # counts summed in int64, selects rather than branches (as fused/triplet_margin.py)
    n_all, total, zero = triplets.sum(), sums.sum(), zero_loss(x)
    if kind == "one":
        loss = total
    else:
        n = nonzero.sum() if kind == "nonzero" else n_all
        loss = torch.where(n > 0, total / n.clamp(min=1), zero)
    return torch.where(n_all == 0, zero, loss)  # no triplet: the reference's zero


register_expansion("cpu", "MultiSimilarityLoss", supports, multi_similarity)
register_expansion("cpu", "LiftedStructureLoss", supports, lifted_structure)
register_expansion("cpu", "NPairsLoss", supports, npairs)
register_expansion("cpu", "GeneralizedLiftedStructureLoss", supports, generalized_lifted)
register_expansion("cpu", "TripletMarginLoss", triplet_supports, triplet_margin)
