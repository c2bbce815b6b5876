"""The soft-label form of each loss (DESIGN §3): the loss of an anchor over candidates v
with labels y ∈ [0, 1],

    ℓ(a) = τ( σ⁺(Σ y·ρ⁺(s(a,v))) + σ⁻(Σ (1−y)·ρ⁻(s(a,v))) ),

given as functions of the candidate cosine similarities `s` (B×K), soft labels `y` (B×K)
and membership `member` (B×K bool: v ∈ V(a)), each returning the loss's own reduction
over its mixed terms (DESIGN §3): pair-reduced losses (contrastive) AvgNonZero-reduce the
positive terms y·ρ⁺ and the negative terms (1−y)·ρ⁻ apart over all member pairs, then
sum; anchor-reduced losses (MS, generalised lifted) take the mean of ℓ(a) over anchors
with a non-empty V(a); CircleLoss keeps its own AvgNonZero over anchors; the proxy losses
keep theirs (per-proxy divisors for ProxyAnchor, mean over queries for ProxyNCA). The
in-batch forms are also given as parts (SOFT_PARTS: the sums and counts of their means),
which add up over disjoint sets of anchors.
Sums Σ y·e^{x} are log-sum-exps of x + log y over the terms with y > 0 (MS β = 50 and
ProxyAnchor α = 32 overflow a naive exp). Clean losses are the case y ∈ {0, 1}, with the
clean loss's conventions for an empty side; the tests check that identity against PML.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..reducers import _kept_sum
from .lse import masked_logsumexp


def loss_metric(s: torch.Tensor, distance) -> torch.Tensor:
    """The loss's own metric of unit vectors with cosine s: s itself for a similarity,
    ‖u − v‖^power = (2 − 2s)^{power/2} for the (normalised) L2 distance."""
    if distance.is_inverted:
        return s
    if distance.p != 2:
        raise NotImplementedError("Metrix on an Lp distance needs p=2")
    d2 = (2 - 2 * s).clamp_min(0)
    # For coincident points 2 − 2s is rounding noise (~eps): its sqrt (~1e-8) would count
    # as a nonzero term under AvgNonZero, and sqrt's slope 1/(2d) would blow it up into a
    # large, meaningless gradient. cdist (PML) gives them d = 0 and the zero subgradient;
    # so do we, below 16·eps.
    coincident = d2 < 16 * torch.finfo(s.dtype).eps
    d = torch.where(coincident, torch.zeros_like(d2),
                    d2.clamp_min(torch.finfo(s.dtype).tiny).sqrt())
    return d if distance.power == 1 else d**distance.power


# Each form below is written as its parts: a list of (Σ kept terms, number kept), whose
# loss is Σ Σ/n over the parts (0 with a graph where n = 0). The parts of disjoint sets of
# anchors add up, so a caller may evaluate the anchors in chunks (fused/metrix_refs.py).


def combine_parts(parts, s):
    """The loss of (total, count) parts: Σ total / count, a part with count 0 giving 0 (with
    a graph; the zero enters only through the select, so it adds no temporary the size of s
    and a non-finite entry of s that no part kept stays out)."""
    zero = s.reshape(-1)[:1].sum() * 0
    terms = [torch.where(n >= 1, total / n.clamp_min(1), zero) for total, n in parts]
    return sum(terms[1:], terms[0]) if terms else zero


def _kept(terms, keep):
    """(Σ terms over keep, #keep); a select, so terms outside keep reach no gradient."""
    return _kept_sum(terms, keep), keep.sum()


def contrastive_parts(s, y, member, distance, pos_margin=0.0, neg_margin=1.0):
    """Pair-reduced: y·[d − m⁺]₊ and (1−y)·[m⁻ − d]₊ over all member pairs, each sub-loss
    AvgNonZero-reduced (the nonzero terms' mean), then summed (as the clean loss)."""
    d = loss_metric(s, distance)
    pos = y * F.relu(distance.margin(d, pos_margin))
    neg = (1 - y) * F.relu(distance.margin(neg_margin, d))
    return [_kept(pos, member & (pos > 0)), _kept(neg, member & (neg > 0))]


def _over_anchors(per_anchor, member):
    """the mean over anchors with a non-empty V(a), as one part"""
    return [_kept(per_anchor, member.any(1))]


def _log_weighted(y, member):
    """log y where the term exists (y > 0 and a member), −inf elsewhere: Σ y e^x becomes a
    plain log-sum-exp of (log y + x), stable at MS's β = 50 and PA's α = 32."""
    keep = member & (y > 0)
    return torch.log(y.clamp_min(torch.finfo(y.dtype).tiny)), keep


def multi_similarity_parts(s, y, member, distance, alpha=2.0, beta=50.0, base=0.5):
    """Anchor-reduced: (1/α)log(1 + Σ y e^{−α(s−base)}) + (1/β)log(1 + Σ (1−y) e^{β(s−base)}),
    mean over anchors with a non-empty V(a)."""
    m = loss_metric(s, distance)
    ly, kp = _log_weighted(y, member)
    l1y, kn = _log_weighted(1 - y, member)
    pos = masked_logsumexp(alpha * distance.margin(m, base) + ly, kp, add_one=True) / alpha
    neg = masked_logsumexp(beta * distance.margin(base, m) + l1y, kn, add_one=True) / beta
    return _over_anchors((pos + neg).squeeze(1), member)


def proxy_anchor_soft(s, y, member, distance, margin=0.1, alpha=32.0):
    """Anchors are proxies (rows of s are proxies, columns mixed candidates; y is the
    candidates' class mass on each proxy): pos Σ_{c with mass} log(1 + Σ y e^{−α(s−δ)}) over
    the number of such proxies, neg Σ_c log(1 + Σ (1−y) e^{α(s+δ)}) over all proxies."""
    m = loss_metric(s, distance)
    ly, kp = _log_weighted(y, member)
    l1y, kn = _log_weighted(1 - y, member)
    pos = masked_logsumexp(alpha * distance.margin(m, margin) + ly, kp, add_one=True).squeeze(1)
    neg = masked_logsumexp(alpha * distance.margin(-margin, m) + l1y, kn, add_one=True).squeeze(1)
    with_pos = int(kp.any(1).sum())
    pos_loss = pos.sum() / with_pos if with_pos else torch.sum(s * 0)
    return pos_loss + neg.sum() / s.shape[0]


def proxy_nca_soft(s, y, member, distance, softmax_scale=1.0, temperature=None,
                   normalize_proxies=None):
    """Rows are mixed candidates (queries), columns proxies: soft-target cross-entropy
    −Σ_c y_c log softmax_c(scale · (−d(v, P_c))), mean over candidates."""
    if normalize_proxies is False:  # s is a cosine: proxies are normalised here
        raise NotImplementedError("Metrix with ProxyNCALoss uses normalised proxies; "
                                  "normalize_proxies=False is not supported")
    scale = softmax_scale / temperature if temperature is not None else softmax_scale
    m = loss_metric(s, distance)
    logits = scale * (m if distance.is_inverted else -m)
    logp = torch.log_softmax(logits, dim=1)
    per_query = -(y * logp).sum(1)
    rows = member.any(1)
    return per_query[rows].mean() if rows.any() else torch.sum(s * 0)


def circle_parts(s, y, member, distance, m=0.4, gamma=80.0):
    """softplus(log Σ y e^{−γ[O_p − s]₊(s − Δ_p)} + log Σ (1−y) e^{γ[s − O_n]₊(s − Δ_n)}),
    O_p = 1 + m, Δ_p = 1 − m, O_n = −m, Δ_n = m, the weights [·]₊ detached (as the clean
    loss); an anchor with no positive or no negative mass gives 0 (log 0 = −∞, as the
    clean loss's rule); AvgNonZero over anchors (the clean loss's reduction)."""
    op, on, delta_p, delta_n = 1 + m, -m, 1 - m, m
    logit_p = -gamma * F.relu(op - s.detach()) * (s - delta_p)
    logit_n = gamma * F.relu(s.detach() - on) * (s - delta_n)
    ly, kp = _log_weighted(y, member)
    l1y, kn = _log_weighted(1 - y, member)
    lse_p = masked_logsumexp(logit_p + ly, kp, add_one=False)
    lse_n = masked_logsumexp(logit_n + l1y, kn, add_one=False)
    both = kp.any(1) & kn.any(1)
    losses = F.softplus(lse_p + lse_n).squeeze(1)
    return [_kept(losses, both & (losses > 0))]


def generalized_lifted_parts(s, y, member, distance, neg_margin=1.0, pos_margin=0.0):
    """[log Σ y e^{d − m⁺} + log Σ (1−y) e^{m⁻ − d}]₊ (margins through distance.margin),
    a side with no mass contributing 0 (the clean loss's, i.e. PML's, empty-side rule);
    mean over anchors with a non-empty V(a)."""
    d = loss_metric(s, distance)
    ly, kp = _log_weighted(y, member)
    l1y, kn = _log_weighted(1 - y, member)
    pos = masked_logsumexp(distance.margin(d, pos_margin) + ly, kp, add_one=False)
    neg = masked_logsumexp(distance.margin(neg_margin, d) + l1y, kn, add_one=False)
    return _over_anchors(F.relu(pos + neg).squeeze(1), member)


# the in-batch anchors' forms as parts (chunkable over anchors)
SOFT_PARTS = {
    "CircleLoss": circle_parts,
    "ContrastiveLoss": contrastive_parts,
    "GeneralizedLiftedStructureLoss": generalized_lifted_parts,
    "MultiSimilarityLoss": multi_similarity_parts,
}


def _whole(parts_fn):
    def soft(s, y, member, distance, **hyper):
        return combine_parts(parts_fn(s, y, member, distance, **hyper), s)
    soft.__name__ = parts_fn.__name__.replace("_parts", "_soft")
    soft.__doc__ = parts_fn.__doc__
    return soft


contrastive_soft = _whole(contrastive_parts)
multi_similarity_soft = _whole(multi_similarity_parts)
circle_soft = _whole(circle_parts)
generalized_lifted_soft = _whole(generalized_lifted_parts)

SOFT_FORMS = {
    "CircleLoss": circle_soft,
    "ContrastiveLoss": contrastive_soft,
    "GeneralizedLiftedStructureLoss": generalized_lifted_soft,
    "MultiSimilarityLoss": multi_similarity_soft,
    "ProxyAnchorLoss": proxy_anchor_soft,
    "ProxyNCALoss": proxy_nca_soft,
}
PROXY_LOSSES = {"ProxyAnchorLoss", "ProxyNCALoss"}
