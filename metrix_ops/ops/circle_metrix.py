"""CircleLoss's embedding-level Metrix term L̃ (pairs "pos_neg" or "anchor_neg") from the
fused op circle_metrix_self_fwd (per-anchor log-sum-exps of the mixed candidates' logits,
ops/lse_mix.py), finished as the reference's circle_soft: per anchor
softplus(log λ + lse⁺ + log(1 − λ) + lse⁻), 0 for an anchor without candidates, and 0 for all
at λ ∈ {0, 1} (a side without label mass: log 0 = −∞); AvgNonZero over anchors."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..reducers import zero_loss
from . import lse_mix

lse_mix.register("circle_metrix_self")
lse_mix.register_refs("circle_metrix_refs", n_out=4)


def circle_metrix_lses(x_unit, labels, m: float, gamma: float, lam: float,
                       pairs: str = "pos_neg", block: int = 1024, refs=None):
    """(lse⁺, lse⁻) per anchor (caller's order) of the logits −γ[O_p − s̃]₊(s̃ − Δ_p) and
    γ[s̃ − O_n]₊(s̃ − Δ_n) over its candidates, the weights [·]₊ detached; −inf without one.
    refs: (unit references, their labels, each anchor's own row of them or −1), else the
    batch against itself."""
    return circle_metrix_terms(x_unit, labels, m, gamma, lam, pairs, block, refs)[:2]


def circle_metrix_terms(x_unit, labels, m: float, gamma: float, lam: float,
                        pairs: str = "pos_neg", block: int = 1024, refs=None,
                        clean: bool = False):
    """(lse⁺, lse⁻ of the candidates, as circle_metrix_lses; lse⁺, lse⁻ of the clean pairs,
    circle_fwd's: −inf for an empty side, and everywhere unless clean) per anchor, both from
    one op's pass over S (the batch against itself, or refs)."""
    return lse_mix.lse_terms("circle_metrix", x_unit, labels, (float(m), float(gamma)), lam,
                             pairs, block, refs, clean)


def circle_clean_rows(lse_pos, lse_neg):
    """The clean loss per anchor from its two log-sum-exps, as circle_fwd's rows:
    softplus(lse⁺ + lse⁻), 0 when a side is empty (a select first, so that no gradient meets
    the −inf)."""
    has = torch.isfinite(lse_pos) & torch.isfinite(lse_neg)
    return torch.where(has, F.softplus(torch.where(has, lse_pos + lse_neg, 0.0)), 0.0)


def circle_metrix_loss(x_unit, labels, m: float, gamma: float, lam: float,
                       pairs: str = "pos_neg", block: int = 1024, like=None, refs=None):
    """L̃ (unweighted); `like` carries the zero loss's graph (default x_unit); refs as
    circle_metrix_lses."""
    like = x_unit if like is None else like
    lse_mix.check_pairs(pairs)
    if not 0.0 < lam < 1.0:  # one side has no label mass anywhere: every ℓ̃(a) is 0
        return zero_loss(like)
    lp, ln = circle_metrix_lses(x_unit, labels, m, gamma, lam, pairs, block, refs)
    return finish_circle_mixed(torch.isfinite(lp), lp + ln, lam, like)


def finish_circle_mixed(has, z, lam: float, like):
    """L̃ from each anchor's z = lse⁺ + lse⁻ and whether it has a candidate (then both sides
    are finite): softplus(log λ + log(1 − λ) + z) per anchor, AvgNonZero over anchors (shared
    by the CPU op's glue and the Triton engine's)."""
    pre = torch.where(has, z, 0.0) + (math.log(lam) + math.log1p(-lam))
    rows = torch.where(has, F.softplus(pre), 0.0)
    kept = (rows > 0).sum()
    return torch.where(kept > 0, rows.sum() / kept.clamp(min=1), zero_loss(like))
