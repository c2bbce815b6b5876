"""GeneralizedLiftedStructureLoss's embedding-level Metrix term L̃ (pairs "pos_neg" or
"anchor_neg") from the fused op lifted_metrix_self_fwd (per-anchor log-sum-exps of the mixed
candidates' exponents, ops/lse_mix.py), finished as the reference's generalized_lifted_soft:
per anchor [log λ + lse⁺ + log(1 − λ) + lse⁻]₊, a side without label mass (λ = 0 or 1)
contributing 0; the mean over anchors with a candidate."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..reducers import zero_loss
from . import lse_mix

lse_mix.register("lifted_metrix_self")
lse_mix.register_refs("lifted_metrix_refs", n_out=4)


def lifted_metrix_lses(x_unit, labels, cosine: bool, pos_margin: float, neg_margin: float,
                       lam: float, pairs: str = "pos_neg", block: int = 1024, refs=None):
    """(lse⁺, lse⁻) per anchor (caller's order) of PML's lifted exponents over its candidates
    (L2: d − m⁺ and m⁻ − d, d = 0 for a candidate coinciding with a; cosine: m⁺ − s̃ and
    s̃ − m⁻); −inf without one. refs: (unit references, their labels, each anchor's own row
    of them or −1), else the batch against itself."""
    return lifted_metrix_terms(x_unit, labels, cosine, pos_margin, neg_margin, lam, pairs,
                               block, refs)[:2]


def lifted_metrix_terms(x_unit, labels, cosine: bool, pos_margin: float, neg_margin: float,
                        lam: float, pairs: str = "pos_neg", block: int = 1024, refs=None,
                        clean: bool = False):
    """(lse⁺, lse⁻ of the candidates, as lifted_metrix_lses; lse⁺, lse⁻ of the clean pairs,
    gen_lifted_fwd's: −inf for an empty side, and everywhere unless clean) per anchor, both
    from one op's pass over S (the batch against itself, or refs)."""
    params = (bool(cosine), float(pos_margin), float(neg_margin))
    return lse_mix.lse_terms("lifted_metrix", x_unit, labels, params, lam, pairs, block, refs,
                             clean)


def gen_lifted_clean_rows(lse_pos, lse_neg):
    """The clean loss per anchor from its two log-sum-exps, as gen_lifted_fwd's rows:
    [lse⁺ + lse⁻]₊, an empty side (−inf) adding 0 (PML's masked log-sum-exp)."""
    return F.relu(torch.where(torch.isfinite(lse_pos), lse_pos, 0.0)
                  + torch.where(torch.isfinite(lse_neg), lse_neg, 0.0))


def lifted_metrix_loss(x_unit, labels, cosine: bool, pos_margin: float, neg_margin: float,
                       lam: float, pairs: str = "pos_neg", block: int = 1024, like=None,
                       refs=None):
    """L̃ (unweighted); `like` carries the zero loss's graph (default x_unit); refs as
    lifted_metrix_lses."""
    like = x_unit if like is None else like
    lp, ln = lifted_metrix_lses(x_unit, labels, cosine, pos_margin, neg_margin, lam, pairs,
                                block, refs)
    return finish_lifted_lses(lp, ln, lam, like)


def finish_lifted_lses(lp, ln, lam: float, like):
    """L̃ from the candidates' per-anchor lse⁺, lse⁻ (−inf without a candidate)."""
    has = torch.isfinite(lp)  # a candidate (then both sides are finite)
    z = torch.zeros_like(lp)
    if lam > 0.0:
        z = z + torch.where(has, lp, 0.0)
    if lam < 1.0:
        z = z + torch.where(has, ln, 0.0)
    return finish_lifted_mixed(has, z, lam, like)


def finish_lifted_mixed(has, z, lam: float, like):
    """L̃ from each anchor's z, the sum of its sides' log-sum-exps that carry label mass
    (lse⁺ for λ > 0, lse⁻ for λ < 1), and whether it has a candidate: [z + log λ +
    log(1 − λ)]₊ (the logs of the sides present), the mean over anchors with a candidate
    (shared by the CPU op's glue and the Triton engine's)."""
    pre = torch.where(has, z, 0.0)
    if lam > 0.0:
        pre = pre + math.log(lam)
    if lam < 1.0:
        pre = pre + math.log1p(-lam)
    rows = torch.where(has, F.relu(pre), 0.0)
    n = has.sum()
    return torch.where(n > 0, rows.sum() / n.clamp(min=1), zero_loss(like))
