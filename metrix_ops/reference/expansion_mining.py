"""Embedding Expansion's hard-negative-pair rule (DESIGN §4), the reference.

For an original anchor i:
  A_i  the anchor side: x_i and the synthetic points on the segments with i as an endpoint;
  Q_i  the negative side: every original and synthetic point of another class;
  P_i  the positives: originals of i's class other than i (synthetic points never are).
Every negative point q ∈ Q_i is scored by the closest pair it forms with the anchor side,

    d̂(i, q) = min_{a ∈ A_i} d(a, q)      (similarities: ŝ(i, q) = max_{a ∈ A_i} s(a, q)),

and the hardest negative pair of i is min_{q ∈ Q_i} d̂(i, q), the closest pair across the
two sides. With n = 0, A_i = {x_i} and d̂ is the plain distance.

How: the best a ∈ A_i is searched without gradient, one anchor-side column at a time
(each a B×P block of closed-form metrics, so memory stays O(B·P), never P×P or
B×|A|×P); the chosen pairs' metrics are then recomputed in closed form with gradient.
Ties go to the earliest candidate: x_i itself first, then the synthetic points in index
order; for the hardest negative the lowest point index (originals before synthetics).
"""
from __future__ import annotations

import torch

from ..spec import LossInputs
from .expansion_points import PointMetric, build_points
from .hphn_triplet import hardest_pair
from .pairs import match_masks


def check_expansion_inputs(inp: LossInputs) -> None:
    """What the closed form and the in-batch points need; NotImplementedError otherwise."""
    d = inp.distance
    if not inp.same_set:
        raise NotImplementedError("Embedding Expansion builds its points from the batch: "
                                  "ref_emb/ref_labels are not supported with expansion=")
    if inp.indices_tuple is not None:
        raise NotImplementedError("Embedding Expansion mines its own hard negative pairs: "
                                  "indices_tuple is not supported with expansion=")
    if not d.normalize_embeddings or d.p != 2:
        raise NotImplementedError(
            "Embedding Expansion interpolates L2-normalised embeddings: the loss distance must "
            f"have normalize_embeddings=True and p=2, got {d!r}")
    if d.is_inverted and d.power != 1:
        raise NotImplementedError("Embedding Expansion with a similarity needs power=1 "
                                  f"(a power of a cosine is not monotone), got {d!r}")


class ExpandedBatch:
    """What every EE loss needs, for the B original anchors:

    clean      B×B loss metric between originals (the loss distance itself, as the clean
               loss computes it), with gradient
    pos        B×B positives among originals (diagonal excluded)
    neg        B×P mask of Q_i (points of another class)
    closest_a  B×P index of the a ∈ A_i closest to each point q (no gradient)
    closest    B×P that closest metric, d̂(i, q), without gradient (for mining only)
    """

    def __init__(self, inp: LossInputs, cfg):
        d = self.distance = inp.distance
        x, labels = inp.embeddings, inp.labels
        self.pts = build_points(labels, cfg.n_points, cfg.pairs)
        self.metric = PointMetric(d.maybe_normalize(x), self.pts, cfg.normalize, d)
        self.clean = d(x)
        self.pos, _ = match_masks(labels, labels, True)
        self.neg = labels[:, None] != self.pts.labels[None, :]
        self.anchors = torch.arange(len(x), device=x.device)
        self.closest_a, self.closest = self._mine()

    def _closer(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a is strictly closer than b in the loss's metric."""
        return a > b if self.distance.is_inverted else a < b

    @torch.no_grad()
    def _mine(self):
        side = self.pts.anchor_side()
        best_a = side[:, :1].expand(-1, self.pts.size).clone()  # x_i itself
        best = self.metric.to_all(side[:, 0])
        # one anchor-side column at a time: a B×P block each, never B×|A|×P; strict
        # improvement keeps the earliest candidate on ties
        for col in side[:, 1:].t():
            v = self.metric.to_all(col.clamp_min(0))
            better = (col >= 0)[:, None] & self._closer(v, best)
            best = torch.where(better, v, best)
            best_a = torch.where(better, col[:, None], best_a)
        return best_a, best

    def negative_scores(self) -> torch.Tensor:
        """B×P d̂(i, q) (ŝ for similarities) recomputed in closed form with gradient from
        the mined pairs; only the entries in `neg` are meaningful."""
        return self.metric.per_column(self.closest_a)

    def hardest_negative(self):
        """(min_q d̂(i, q) per anchor with gradient, has-a-negative mask); ties go to the
        lowest point index."""
        inverted = self.distance.is_inverted
        masked = self.closest.masked_fill(~self.neg, float("-inf") if inverted else float("inf"))
        q = masked.argmax(1) if inverted else masked.argmin(1)
        return self.metric(self.closest_a[self.anchors, q], q), self.neg.any(1)

    def hardest_positive(self):
        """(the farthest original positive's metric with gradient, has-a-positive mask)."""
        return hardest_pair(self.clean, self.pos, self.distance.is_inverted, farthest=True)
