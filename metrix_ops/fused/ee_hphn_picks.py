"""HPHNTripletLoss with Embedding Expansion on the GPU engines: each anchor's picks from a
per-point mining op (the Triton engine's triton_ee_point_mine, the CUDA engine's
ee_point_mine: per point of the expansion its closest point of another class, ties to the
lowest), in the CPU op's format (ops.ee_mining.ee_hphn_mine), so that fused/hphn_triplet.py's
picks_loss recomputes the chosen distances with gradient the same way on every engine."""
from __future__ import annotations

import torch

from ..reference.expansion_points import points_on_segments
from .hphn_triplet import point_norm


def ee_hphn_picks(x_unit, labels, seg_i, seg_j, n_points: int, inverted: bool, point_mine,
                  farthest_positive) -> torch.Tensor:
    """B × 7 int64 [p, a_u, a_w, a_k, q_u, q_w, q_k] per anchor (−1: none): the farthest
    original positive, and the closest pair across the anchor side and the negative points;
    points as (u, w, k), originals (i, i, n+1).

    point_mine(x, pts, lam, scale) -> (best, col) per point of pts
    (reference/expansion_points.ExpansionPoints; lam its λ and scale its norm in x's dtype);
    farthest_positive(x, labels) -> (B,) each anchor's farthest original positive (−1: none)."""
    x = x_unit.detach().contiguous()
    labels = labels.long()
    b, n, dev = len(labels), n_points, x.device
    if b == 0:
        return torch.full((0, 7), -1, dtype=torch.long, device=dev)
    pts = points_on_segments(labels, n, seg_i, seg_j)
    # ‖point‖ as the reference's PointMetric takes it (originals exactly 1; the cosine divides
    # by it; with normalize the L2 of the normalised points is √(2 − 2·cosine))
    lam = pts.lam.to(x.dtype)
    best, col = point_mine(x, pts, lam, point_norm(x, pts.u, pts.w, lam))
    out = torch.full((b, 7), -1, dtype=torch.long, device=x.device)
    out[:, 0] = farthest_positive(x, labels)
    # per anchor over its side: the closest value, then the lowest negative point, then the
    # earliest side point
    side = pts.anchor_side()
    valid = (side >= 0) & (col[side.clamp_min(0)] >= 0)
    vals = best[side.clamp_min(0)]
    far = float("-inf") if inverted else float("inf")
    vals = torch.where(valid, vals, far)
    top = vals.max(1, keepdim=True).values if inverted else vals.min(1, keepdim=True).values
    tied = valid & (vals == top)
    cols = torch.where(tied, col[side.clamp_min(0)], pts.size)
    q = cols.min(1).values
    first = torch.argmax((tied & (cols == q[:, None])).to(torch.int8), 1)
    a = side.gather(1, first[:, None])[:, 0]
    has = tied.any(1)

    def enc(t):
        k = torch.where(pts.synthetic[t], torch.round(pts.lam[t] * (n + 1)).long(),
                        torch.full_like(t, n + 1))
        return torch.stack([pts.u[t], pts.w[t], k], 1)
    a, q = a.clamp_min(0), q.clamp(0, max(pts.size - 1, 0))
    out[has, 1:] = torch.cat([enc(a), enc(q)], 1)[has]
    return out
