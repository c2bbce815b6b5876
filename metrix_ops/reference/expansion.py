"""Embedding Expansion (Ko & Gu, CVPR 2020), the reference: `expansion_loss_dict`, called
by the driver when a loss is given `expansion=mo.Expansion(n_points, pairs, normalize)`.

Points (expansion_points.py): n synthetic points x̄_k = (k x_i + (n+1−k) x_j)/(n+1),
k = 1..n, on each segment (i, j) — every unordered positive pair ("all") or rows
(2t, 2t+1) ("adjacent") — L2-normalised when `normalize`; computed in closed form from
Gram entries, never stacked.
Hard-negative-pair rule (expansion_mining.py): anchors are the B originals; for anchor i
every negative point q (original or synthetic, of another class) is scored by the closest
pair across i's side A_i (x_i and the synthetic points on its segments) and q:
d̂(i, q) = min_{a ∈ A_i} d(a, q) (ŝ = max s for similarities). Positives are originals only;
synthetic points are never positives and never anchors.

Per loss — each with its usual hyper-parameters, distance and reducer, and each equal to
the clean loss when n_points = 0:
  HPHNTripletLoss      [d(i, p*) − min_{q ∈ Q_i} d̂(i, q) + m]₊ per anchor with a positive
                       and a negative; p* its farthest original positive.
  TripletMarginLoss    "all" triplets extended to the new negatives: one term per
                       (i, p, q), p ∈ P_i an original positive, q ∈ Q_i any original or
                       synthetic negative, [margin(d(i, p), d̂(i, q)) + m]₊ (softplus if
                       smooth_loss), AvgNonZero over all of them by default. Synthetic points
                       add triplets only as negatives, each scored by its closest pair.
  MultiSimilarityLoss  per anchor (1/α)log(1 + Σ_{P_i} e^{−α(s−base)})
                       + (1/β)log(1 + Σ_{Q_i} e^{β(ŝ−base)}), mean over the B anchors.
  LiftedStructureLoss  per ordered original positive pair (a, p), PML's form with the
                       negatives of both ends: ½[log(Σ_{Q_a} e^{m−d̂(a,·)} + Σ_{Q_p} e^{m−d̂(p,·)})
                       + d(a, p) − m_pos]₊², mean over positive pairs by default.
  GeneralizedLiftedStructureLoss  per anchor [log Σ_{P_i} e^{d(i,p) − m_pos}
                       + log Σ_{Q_i} e^{m_neg − d̂(i,q)}]₊ (an empty side adds 0, as PML's
                       masked log-sum-exp), mean over the B anchors by default.
  NPairsLoss           PML's pairs (a_k, p_k), one per label; anchor a_k's target logit is
                       s(a_k, p_k), its negative logits ŝ(a_k, p_l), l ≠ k, and ŝ(a_k, q) for
                       every synthetic point q of another class (−d̂ with a distance).
Limits: the loss distance must normalise (p = 2; a similarity with power 1); no ref_emb
and no indices_tuple (EE mines its own negatives); TripletMarginLoss only with
triplets_per_anchor="all" and swap=False.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..spec import LossInputs
from .expansion_mining import ExpandedBatch, check_expansion_inputs
from .hphn_triplet import ZERO, hphn_terms
from .lse import masked_logsumexp
from .npairs import unique_label_pos_pairs

__all__ = ["expansion_loss_dict", "EXPANSION_LOSSES"]


def _zero() -> dict:
    return {k: dict(v) for k, v in ZERO.items()}


def hphn_triplet(eb: ExpandedBatch, margin=0.2):
    hp, has_pos = eb.hardest_positive()
    hn, has_neg = eb.hardest_negative()
    return hphn_terms(hp, has_pos, hn, has_neg, eb.distance, margin)


def triplet_margin(eb: ExpandedBatch, margin=0.05, swap=False, smooth_loss=False,
                   triplets_per_anchor="all"):
    # swap / triplets_per_anchor: refused by check_expansion
    a, p, q = torch.where(eb.pos[:, :, None] & eb.neg[:, None, :])
    if len(a) == 0:
        return _zero()
    an = eb.negative_scores()[a, q]
    violation = eb.distance.margin(eb.clean[a, p], an) + margin
    losses = F.softplus(violation) if smooth_loss else F.relu(violation)
    return {"loss": {"losses": losses, "indices": (a, p, q), "reduction_type": "triplet"}}


def multi_similarity(eb: ExpandedBatch, alpha=2.0, beta=50.0, base=0.5):
    if not eb.pos.any() and not eb.neg.any():  # PML: no pairs at all, zero loss
        return _zero()
    d = eb.distance
    # log(1 + Σ e^x) as a log-sum-exp with a 0 logit (β = 50 overflows the naive form)
    pos = masked_logsumexp(alpha * d.margin(eb.clean, base), eb.pos, add_one=True) / alpha
    neg = masked_logsumexp(beta * d.margin(base, eb.negative_scores()), eb.neg,
                           add_one=True) / beta
    losses = (pos + neg).squeeze(1)
    return {"loss": {"losses": losses, "indices": eb.anchors, "reduction_type": "element"}}


def lifted_structure(eb: ExpandedBatch, neg_margin=1.0, pos_margin=0.0):
    a, p = torch.where(eb.pos)
    if len(a) == 0 or not eb.neg.any():  # PML: zero without positive or negative pairs
        return _zero()
    d = eb.distance
    neg_terms = d.margin(neg_margin, eb.negative_scores())  # B×P, m − d̂
    terms = torch.cat([neg_terms[a], neg_terms[p]], dim=1)
    keep = torch.cat([eb.neg[a], eb.neg[p]], dim=1)
    # a pair none of whose ends has a negative gets log-sum-exp 0, PML's empty-row rule
    lse = masked_logsumexp(terms, keep, add_one=False).squeeze(1)
    losses = F.relu(lse + d.margin(eb.clean[a, p], pos_margin)) ** 2 / 2
    return {"loss": {"losses": losses, "indices": (a, p), "reduction_type": "pos_pair"}}


def generalized_lifted_structure(eb: ExpandedBatch, neg_margin=1.0, pos_margin=0.0):
    if not eb.pos.any() and not eb.neg.any():  # PML: no pairs at all, zero loss
        return _zero()
    d = eb.distance
    pos = masked_logsumexp(d.margin(eb.clean, pos_margin), eb.pos, add_one=False)
    neg = masked_logsumexp(d.margin(neg_margin, eb.negative_scores()), eb.neg, add_one=False)
    losses = F.relu(pos + neg).squeeze(1)
    return {"loss": {"losses": losses, "indices": eb.anchors, "reduction_type": "element"}}


def npairs(eb: ExpandedBatch, labels: torch.Tensor):
    a, p = unique_label_pos_pairs(None, labels)
    if len(a) == 0:
        return _zero()
    sign = 1 if eb.distance.is_inverted else -1  # logits are similarities, or −distances
    scores = sign * eb.negative_scores()  # B×P, the hard-negative-pair score of every point
    k = torch.arange(len(a), device=a.device)
    pair_logits = scores[a][:, p]  # ŝ(a_k, p_l); the diagonal is replaced by the plain s
    pair_logits = pair_logits.diagonal_scatter(sign * eb.clean[a, p])
    synth = eb.pts.synthetic[None, :] & eb.neg[a]
    synth_logits = scores[a].masked_fill(~synth, float("-inf"))
    logits = torch.cat([pair_logits, synth_logits], dim=1)
    losses = F.cross_entropy(logits, k, reduction="none")
    return {"loss": {"losses": losses, "indices": a, "reduction_type": "element"}}


EXPANSION_LOSSES = {"HPHNTripletLoss": hphn_triplet, "TripletMarginLoss": triplet_margin,
                    "MultiSimilarityLoss": multi_similarity,
                    "LiftedStructureLoss": lifted_structure, "NPairsLoss": npairs,
                    "GeneralizedLiftedStructureLoss": generalized_lifted_structure}


def check_expansion(name: str, params: dict, inp: LossInputs) -> None:
    """The loss, distance and options EE takes (NotImplementedError otherwise), whatever
    the batch holds: the driver runs it on an empty batch too."""
    if name not in EXPANSION_LOSSES:
        raise NotImplementedError(f"Embedding Expansion is implemented for "
                                  f"{sorted(EXPANSION_LOSSES)}, not {name}")
    check_expansion_inputs(inp)
    if name == "TripletMarginLoss" and (params.get("swap", False)
                                        or params.get("triplets_per_anchor", "all") != "all"):
        raise NotImplementedError("Embedding Expansion with TripletMarginLoss supports "
                                  "triplets_per_anchor='all' and swap=False")


def expansion_loss_dict(name: str, params: dict, inp: LossInputs, cfg) -> dict:
    """The PML-style loss dict of loss `name` with Embedding Expansion `cfg`."""
    check_expansion(name, params, inp)
    eb = ExpandedBatch(inp, cfg)
    if name == "NPairsLoss":
        return npairs(eb, inp.labels, **params)
    return EXPANSION_LOSSES[name](eb, **params)
