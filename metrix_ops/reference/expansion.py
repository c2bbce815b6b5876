"""Embedding Expansion (CVPR 2020), the reference: losses whose negative terms range over
original and synthetic points with the hard-negative-pair rule (DESIGN §4).

For an original anchor i, A_i is i plus the synthetic points on its own segments and Q_i
every original or synthetic point of another class. Each negative point q is scored by
the closest pair across the sides, d_EE(i, q) = min_{a ∈ A_i} d(a, q) (similarities: the
largest). The hardest negative pair of i is min_q d_EE(i, q). Positives are originals only;
synthetic points are never positives. Per loss:
  HPHNTripletLoss   [max_p d(i,p) − min_q d_EE(i,q) + m]₊ per anchor with a positive and a
                    negative (see hphn_triplet.py)
  TripletMarginLoss every (i, p, q), p an original positive, q ∈ Q_i:
                    [margin(d(i,p), d_EE(i,q)) + m]₊ (softplus if smooth); AvgNonZero
  MultiSimilarityLoss  positive terms over original positives, negative terms over Q_i with
                    s_EE; mean over anchors
  LiftedStructureLoss  per original positive pair (i, p): negatives Q_i scored from i's
                    side and Q_p from p's side
  NPairsLoss        each anchor's logits are its pair's positives (as PML) plus s_EE to the
                    synthetic points of other classes
Distances come from Gram entries (expansion_points.py); the loss's distance must be the
normalised L2 distance or cosine similarity.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..reducers import zero_loss
from ..spec import LossInputs
from .expansion_points import build_points, point_gram
from .lse import masked_logsumexp
from .pairs import match_masks

SUPPORTED = ("HPHNTripletLoss", "TripletMarginLoss", "MultiSimilarityLoss",
             "LiftedStructureLoss", "NPairsLoss")


def _metric(inner, sq, distance):
    """The loss's metric between all points: cosine (similarity) or L2 distance^power."""
    if distance.is_inverted:
        c = sq.clamp_min(0).sqrt().clamp_min(1e-12)
        return inner / (c[:, None] * c[None, :])
    if distance.p != 2:
        raise NotImplementedError("Embedding Expansion needs the L2 distance (p=2) or cosine")
    d2 = (sq[:, None] + sq[None, :] - 2 * inner).clamp_min(0)
    # coincident points: zero subgradient, as cdist (see metrix_soft_forms.loss_metric)
    tiny = d2 < 16 * torch.finfo(d2.dtype).eps
    d = torch.where(tiny, d2.detach().sqrt(), d2.clamp_min(torch.finfo(d2.dtype).tiny).sqrt())
    return d if distance.power == 1 else d**distance.power


class ExpandedBatch:
    """Everything an EE loss needs: the clean B×B metric, and the B×P hard-negative-pair
    scores d_EE with the negative mask Q."""

    def __init__(self, inp: LossInputs, cfg):
        if not inp.same_set:
            raise NotImplementedError("Embedding Expansion works within the batch: ref_emb is not supported")
        if not inp.distance.normalize_embeddings:
            raise NotImplementedError("Embedding Expansion needs normalize_embeddings=True")
        x, labels = inp.embeddings, inp.labels
        b = len(x)
        self.distance = inp.distance
        self.pts = build_points(labels, cfg.n_points, cfg.pairs)
        inner, sq = point_gram(x, self.pts, cfg.normalize)
        mat = _metric(inner, sq, inp.distance)  # P × P
        self.clean = mat[:b, :b]
        self.pos, _ = match_masks(labels, labels, True)
        self.neg_q = labels[:, None] != self.pts.labels[None, :]  # B × P
        # d_EE(i, q) = best over a ∈ A_i of mat[a, q]: start from the original i's row and
        # fold in every synthetic point's row at both endpoints of its segment (a B×P×P
        # stack would be the dense memory the design forbids)
        reduce = "amax" if inp.distance.is_inverted else "amin"
        syn = ~self.pts.is_original
        rows = mat[syn]
        ee = mat[:b]
        for end in (self.pts.u[syn], self.pts.w[syn]):
            ee = ee.scatter_reduce(0, end[:, None].expand_as(rows), rows, reduce=reduce,
                                   include_self=True)
        self.ee = ee.masked_fill(~self.neg_q, 0.0)

    def hardest_negative(self):
        """Per anchor: the hardest negative pair score, and whether it has any negative."""
        d = self.distance
        fill = float("-inf") if d.is_inverted else float("inf")
        s = self.ee.masked_fill(~self.neg_q, fill)
        best = s.max(1).values if d.is_inverted else s.min(1).values
        return best, self.neg_q.any(1)


def _zero():
    return {"loss": {"losses": 0, "indices": None, "reduction_type": "already_reduced"}}


def hphn(eb: ExpandedBatch, margin):
    d = eb.distance
    fill = float("inf") if d.is_inverted else float("-inf")
    ap = eb.clean.masked_fill(~eb.pos, fill)
    hardest_pos = ap.min(1).values if d.is_inverted else ap.max(1).values
    hardest_neg, has_neg = eb.hardest_negative()
    keep = eb.pos.any(1) & has_neg
    if not keep.any():
        return _zero()
    losses = F.relu(d.margin(hardest_pos[keep], hardest_neg[keep]) + margin)
    a = torch.where(keep)[0]
    return {"loss": {"losses": losses, "indices": a, "reduction_type": "element"}}


def triplet(eb: ExpandedBatch, margin=0.05, swap=False, smooth_loss=False, triplets_per_anchor="all"):
    if swap or triplets_per_anchor != "all":
        raise NotImplementedError("Embedding Expansion with TripletMarginLoss supports "
                                  "triplets_per_anchor='all' without swap")
    a, p, q = torch.where(eb.pos[:, :, None] & eb.neg_q[:, None, :])
    if len(a) == 0:
        return _zero()
    v = eb.distance.margin(eb.clean[a, p], eb.ee[a, q]) + margin
    losses = F.softplus(v) if smooth_loss else F.relu(v)
    return {"loss": {"losses": losses, "indices": (a, p, q), "reduction_type": "triplet"}}


def multi_similarity(eb: ExpandedBatch, alpha=2.0, beta=50.0, base=0.5):
    d = eb.distance
    if not eb.pos.any() and not eb.neg_q.any():
        return _zero()
    pos = masked_logsumexp(alpha * d.margin(eb.clean, base), eb.pos, add_one=True) / alpha
    neg = masked_logsumexp(beta * d.margin(base, eb.ee), eb.neg_q, add_one=True) / beta
    losses = (pos + neg).squeeze(1)
    return {"loss": {"losses": losses, "indices": torch.arange(len(losses), device=losses.device),
                     "reduction_type": "element"}}


def lifted_structure(eb: ExpandedBatch, neg_margin=1.0, pos_margin=0.0):
    d = eb.distance
    a, p = torch.where(eb.pos)
    if len(a) == 0 or not eb.neg_q.any():
        return _zero()
    terms = torch.cat([d.margin(neg_margin, eb.ee[a]), d.margin(neg_margin, eb.ee[p])], dim=1)
    keep = torch.cat([eb.neg_q[a], eb.neg_q[p]], dim=1)
    lse = masked_logsumexp(terms, keep, add_one=False).squeeze(1)
    losses = F.relu(lse + d.margin(eb.clean[a, p], pos_margin)) ** 2 / 2
    return {"loss": {"losses": losses, "indices": (a, p), "reduction_type": "pos_pair"}}


def npairs(eb: ExpandedBatch, inp: LossInputs):
    from .npairs import unique_label_pos_pairs
    if not inp.distance.is_inverted:
        raise NotImplementedError("Embedding Expansion with NPairsLoss needs a similarity")
    a, p = unique_label_pos_pairs(inp.indices_tuple, inp.labels)
    if len(a) == 0:
        return _zero()

    logits_pairs = eb.clean[a][:, p]  # K × K, PML's N-pair logits
    synth = ~eb.pts.is_original
    extra = eb.ee[a][:, synth].masked_fill(~eb.neg_q[a][:, synth], float("-inf"))
    logits = torch.cat([logits_pairs, extra], dim=1)
    targets = torch.arange(len(a), device=logits.device)
    losses = F.cross_entropy(logits, targets, reduction="none")
    return {"loss": {"losses": losses, "indices": a, "reduction_type": "element"}}


def expansion_loss_dict(name: str, params: dict, inp: LossInputs, cfg) -> dict:
    if name not in SUPPORTED:
        raise NotImplementedError(f"Embedding Expansion is implemented for {list(SUPPORTED)}, not {name}")
    if inp.indices_tuple is not None and name != "NPairsLoss":
        raise NotImplementedError("Embedding Expansion mines its own hard negative pairs: "
                                  "indices_tuple is not supported with expansion=")
    eb = ExpandedBatch(inp, cfg)
    if name == "HPHNTripletLoss":
        return hphn(eb, params["margin"])
    if name == "TripletMarginLoss":
        return triplet(eb, **params)
    if name == "MultiSimilarityLoss":
        return multi_similarity(eb, **params)
    if name == "LiftedStructureLoss":
        return lifted_structure(eb, **params)
    return npairs(eb, inp)


__all__ = ["expansion_loss_dict"]
