"""Embedding Expansion's points (CVPR 2020), never materialised: each is an index into a
table of (endpoints, weight), and every inner product or distance between two of them is
an O(1) closed form in Gram entries (DESIGN §1).

Points 0..B−1 are the originals x̂_i (unit rows: the loss distance normalises them).
For each segment e = (i, j) and k = 1..n there is a synthetic point

    x̄_{e,k} = λ x̂_i + (1−λ) x̂_j,  λ = k/(n+1)     (the paper's (k x_i + (n+1−k) x_j)/(n+1)),

L2-normalised when `Expansion.normalize`; its index is B + e·n + (k−1). An original is the
degenerate segment (i, i) with λ = 1. With G = X̂X̂ᵀ, for points p = (u, w, λ), q = (u', w', μ)

    ⟨p, q⟩ = λμ G_uu' + λ(1−μ) G_uw' + (1−λ)μ G_wu' + (1−λ)(1−μ) G_ww',

so every point metric is O(1) from Gram entries: no (B+S)×D stack, no cdist over points.
Gradients flow into G (B×B) and from there to the embeddings.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..distances import BaseDistance


def expansion_segments(labels: torch.Tensor, pairs: str):
    """The segments (i, j) synthetic points lie on, as two index tensors.

    "all": every *unordered* positive pair i < j, once. The official code generates points
    per row, i.e. for both (i, j) and (j, i); because the grid λ = k/(n+1) is symmetric
    (k ↔ n+1−k) the two directions give the same points, so it holds each synthetic point
    twice. That cannot change a hardest pair (a min), but would double-count points in the
    losses that sum over negatives, so each point is kept once here.
    "adjacent": rows (2t, 2t+1), the official pairing for class-contiguous batches of an
    even size; a pair that is not positive, or an odd batch, raises ValueError."""
    b = len(labels)
    if pairs == "adjacent":
        if b % 2:
            raise ValueError(f"Expansion(pairs='adjacent') pairs rows 2t and 2t+1, so it needs an "
                             f"even batch size; got {b} rows")
        i = torch.arange(0, b, 2, device=labels.device)
        if torch.compiler.is_compiling():
            # no Python branch on tensor data in a graph; nor a device assert, which inductor
            # may fuse into a parallel CPU kernel, where its throw terminates the process. The
            # fused ops (CPU, Triton and CUDA EE) check their segments' labels at run time
            # instead (an error there)
            return i, i + 1
        bad = torch.where(labels[i] != labels[i + 1])[0]
        if len(bad):
            t = int(i[bad[0]])
            raise ValueError(
                f"Expansion(pairs='adjacent') pairs rows 2t and 2t+1, which must share a label "
                f"(a class-contiguous batch, e.g. from an m-per-class sampler with even m); rows "
                f"{t} and {t + 1} have labels {labels[t].item()} and {labels[t + 1].item()} "
                f"({len(bad)} such pair(s)). Use pairs='all' for any batch order.")
        return i, i + 1
    if pairs != "all":
        raise ValueError(f"Expansion pairs must be 'all' or 'adjacent', got {pairs!r}")
    return torch.where((labels[:, None] == labels[None, :]).triu(diagonal=1))


@dataclass
class ExpansionPoints:
    """The index table of all points; P = B + n·(number of segments)."""

    b: int
    n: int
    seg_i: torch.Tensor  # (S,) segments' first endpoint
    seg_j: torch.Tensor  # (S,) second endpoint
    u: torch.Tensor  # (P,) endpoint weighted by lam (the original itself for originals)
    w: torch.Tensor  # (P,) the other endpoint
    lam: torch.Tensor  # (P,) float64 weight of u (1 for originals)
    labels: torch.Tensor  # (P,) a synthetic point has its segment's class
    synthetic: torch.Tensor  # (P,) bool

    @property
    def size(self) -> int:
        return len(self.u)

    def anchor_side(self) -> torch.Tensor:
        """B × (1 + n·maxdeg) point indices of A_i, padded with −1: column 0 is x_i itself,
        then the synthetic points of every segment with i as an endpoint."""
        b, n, dev = self.b, self.n, self.u.device
        s = len(self.seg_i)
        if n == 0 or s == 0:
            return torch.arange(b, device=dev)[:, None]
        ends = torch.cat([self.seg_i, self.seg_j])
        segs = torch.arange(s, device=dev).repeat(2)
        order = torch.argsort(ends, stable=True)
        ends, segs = ends[order], segs[order]
        deg = torch.bincount(ends, minlength=b)
        first = torch.cumsum(deg, 0) - deg
        rank = torch.arange(len(ends), device=dev) - first[ends]
        table = torch.full((b, int(deg.max())), -1, dtype=torch.long, device=dev)
        table[ends, rank] = segs
        k = torch.arange(n, device=dev)
        pts = b + table[:, :, None] * n + k  # B × maxdeg × n
        pts = pts.masked_fill(table[:, :, None] < 0, -1).reshape(b, -1)
        return torch.cat([torch.arange(b, device=dev)[:, None], pts], dim=1)


def build_points(labels: torch.Tensor, n_points: int, pairs: str) -> ExpansionPoints:
    return points_on_segments(labels, n_points, *expansion_segments(labels, pairs))


def points_on_segments(labels: torch.Tensor, n_points: int, seg_i: torch.Tensor,
                       seg_j: torch.Tensor) -> ExpansionPoints:
    """The point table of given segments, in O(P) (build_points with its segments found)."""
    b, dev = len(labels), labels.device
    n, s = n_points, len(seg_i)
    orig = torch.arange(b, device=dev)
    # synthetic point B + e·n + (k−1): segment-major, k = 1..n within a segment
    k = torch.arange(1, n + 1, device=dev, dtype=torch.float64)
    lam = torch.cat([torch.ones(b, dtype=torch.float64, device=dev),
                     (k / (n + 1)).repeat(s)])
    u = torch.cat([orig, seg_i.repeat_interleave(n)])
    w = torch.cat([orig, seg_j.repeat_interleave(n)])
    synthetic = torch.arange(len(u), device=dev) >= b
    return ExpansionPoints(b, n, seg_i, seg_j, u, w, lam, labels[u], synthetic)


class PointMetric:
    """The loss's metric between points, in closed form from Gram entries.

    H = [⟨x̂_b, q⟩] (B×P) is built once from G = X̂X̂ᵀ with two column gathers
    (⟨x̂_b, q⟩ = μ G_bu' + (1−μ) G_bw'); then ⟨p, q⟩ = λ H_uq + (1−λ) H_wq for any p.
    Similarity (cosine): ⟨p, q⟩/(‖p‖‖q‖), the cosine of the points whether or not they were
    normalised. Distance: L2 between the points as built (then `distance.power`):
    normalised points have norm 1, unnormalised synthetic points keep their norm < 1, as
    the official code measures them."""

    def __init__(self, unit_x: torch.Tensor, pts: ExpansionPoints, normalize: bool,
                 distance: BaseDistance):
        self.pts, self.distance = pts, distance
        G = unit_x @ unit_x.t()
        self.lam = pts.lam.to(unit_x.dtype)
        self.H = self.lam * G[:, pts.u] + (1 - self.lam) * G[:, pts.w]
        all_pts = torch.arange(pts.size, device=unit_x.device)
        sq = self.inner(all_pts, all_pts)  # ‖q‖² of the unnormalised points
        ones = torch.ones_like(sq)
        # originals are unit by construction: use exactly 1 rather than G_ii = 1 ± ulp
        norm = torch.where(pts.synthetic, sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt(), ones)
        if distance.is_inverted:
            self.scale, self.sq = norm, None
        elif normalize:
            self.scale, self.sq = norm, ones
        else:
            self.scale, self.sq = ones, torch.where(pts.synthetic, sq, ones)

    def inner(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """⟨p, q⟩ of the unnormalised points for broadcastable index tensors p and q."""
        lp = self.lam[p]
        return lp * self.H[self.pts.u[p], q] + (1 - lp) * self.H[self.pts.w[p], q]

    def __call__(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """The metric between points p and q (broadcastable index tensors)."""
        return self._finish(self.inner(p, q), p, q)

    def to_all(self, p: torch.Tensor) -> torch.Tensor:
        """len(p) × P: the metric from each point p[r] to every point (row gathers of H)."""
        lp = self.lam[p][:, None]
        s = lp * self.H[self.pts.u[p]] + (1 - lp) * self.H[self.pts.w[p]]
        return self._finish(s, p[:, None], slice(None))

    def per_column(self, p: torch.Tensor) -> torch.Tensor:
        """R × P: the metric between point p[r, q] and point q (column-wise gathers of H)."""
        lp = self.lam[p]
        s = lp * self.H.gather(0, self.pts.u[p]) + (1 - lp) * self.H.gather(0, self.pts.w[p])
        return self._finish(s, p, slice(None))

    def _finish(self, s, p, q):
        s = s / (self.scale[p] * self.scale[q])
        if self.distance.is_inverted:
            return s
        d = safe_sqrt(self.sq[p] + self.sq[q] - 2 * s)
        return d if self.distance.power == 1 else d**self.distance.power


def safe_sqrt(d2: torch.Tensor) -> torch.Tensor:
    """√d² with cdist's convention at coincident points: value 0, zero subgradient (d² below
    a few ulps of the unit-norm terms it is computed from is rounding, not distance)."""
    tiny = d2 < 16 * torch.finfo(d2.dtype).eps
    return torch.where(tiny, torch.zeros_like(d2), d2.clamp_min(torch.finfo(d2.dtype).eps).sqrt())
