"""HPHNTripletLoss with Embedding Expansion on the GPU engines: each anchor's picks from a
per-point mining op (the Triton engine's triton_ee_point_mine, the CUDA engine's
ee_point_mine: per point of the expansion its closest point of another class, ties to the
lowest), in the CPU op's format (ops.ee_mining.ee_hphn_mine), so that fused/hphn_triplet.py's
picks_loss recomputes the chosen distances with gradient the same way on every engine."""
from __future__ import annotations

import torch

from ..reference.expansion_points import points_on_segments
from .hphn_triplet import expansion_norms


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
    best, col = point_mine(x, pts, lam, expansion_norms(x, pts, lam))
    from ..triton.launch import usable_on
    if usable_on(dev):  # one kernel for the pairs and their encoding (triton/ee_side_pairs.py)
        from ..triton.ee_side_pairs import ee_side_pairs_triton
        side = ee_side_pairs_triton(best, col, pts.seg_i, pts.seg_j, b, n, inverted)
    else:
        side = side_pairs_torch(pts, best, col, inverted)
    return torch.cat([farthest_positive(x, labels)[:, None], side], 1)


def side_pairs_torch(pts, best, col, inverted: bool) -> torch.Tensor:
    """(B, 6) int64 [a_u, a_w, a_k, q_u, q_w, q_k] per anchor (−1: none): its closest side
    pair (_closest_side_pairs), points encoded as (u, w, k), originals (i, i, n+1). In
    PyTorch, where Triton does not run (triton/ee_side_pairs.py is the kernel)."""
    n = pts.n
    a, q, has = _closest_side_pairs(pts, best, col, inverted)

    def enc(t):
        k = torch.where(pts.synthetic[t], torch.round(pts.lam[t] * (n + 1)).long(),
                        torch.full_like(t, n + 1))
        return torch.stack([pts.u[t], pts.w[t], k], 1)
    return torch.where(has[:, None], torch.cat([enc(a), enc(q)], 1), -1)


def _closest_side_pairs(pts, best, col, inverted: bool):
    """Per anchor i, over its side A_i (x_i, then the points of the segments with i as their
    first endpoint, then as their second, each k ascending: the reference's order), the
    side point a and negative point q of the closest pair: the closest value, then the
    lowest q, then the earliest a. (a, q, has a pair), each (B,).

    By scatter reductions over the side entries (B + 2·n·S of them), not a padded
    B × (1 + n·max degree) table, so no shape depends on the labels' values and the modules
    trace under torch.compile(fullgraph=True)."""
    b, dev = pts.b, best.device
    syn_u, syn_w = pts.u[b:], pts.w[b:]
    rows = torch.arange(b, device=dev)
    point = torch.arange(pts.size, device=dev)
    owner = torch.cat([rows, syn_u, syn_w])
    order = torch.argsort(owner, stable=True)  # entries in A_i order, anchor by anchor
    owner = owner[order]
    side = torch.cat([rows, point[b:], point[b:]])[order]
    valid = col[side] >= 0
    vals = best[side]
    far = float("-inf") if inverted else float("inf")
    top = torch.full((b,), far, dtype=vals.dtype, device=dev).scatter_reduce(
        0, owner, torch.where(valid, vals, far), "amax" if inverted else "amin")
    tied = valid & (vals == top[owner])
    big = pts.size
    q = torch.full((b,), big, dtype=torch.long, device=dev).scatter_reduce(
        0, owner, torch.where(tied, col[side], big), "amin")
    entry = torch.arange(len(owner), device=dev)
    first = torch.full((b,), len(owner), dtype=torch.long, device=dev).scatter_reduce(
        0, owner, torch.where(tied & (col[side] == q[owner]), entry, len(owner)), "amin")
    has = q < big
    a = side[first.clamp_max(len(owner) - 1)]  # (B ≥ 1: at least one entry)
    return torch.where(has, a, 0), torch.where(has, q, 0), has
