from __future__ import annotations

import torch

from ..distances import LpDistance
from ..reference.pairs import match_masks
from .base import BaseMiner


def batch_hard(mat, pos, neg, inverted: bool):
    """(a, p, n): for each anchor with a positive and a negative, its farthest positive and
    closest negative (lowest index on ties, as torch.max/min)."""
    inf = torch.finfo(mat.dtype).max
    if inverted:
        p = mat.masked_fill(~pos, inf).min(1).indices
        n = mat.masked_fill(~neg, -inf).max(1).indices
    else:
        p = mat.masked_fill(~pos, -inf).max(1).indices
        n = mat.masked_fill(~neg, inf).min(1).indices
    a = torch.where(pos.any(1) & neg.any(1))[0]
    return a, p[a], n[a]


class BatchHardMiner(BaseMiner):
    """Batch-hard triplets (Hermans et al. 2017), PML's BatchHardMiner: (a, p, n)."""

    default_distance = LpDistance

    def mine(self, x, labels, ref, ref_labels, same_set):
        pos, neg = match_masks(labels, ref_labels, same_set)
        return batch_hard(self.distance(x, ref), pos, neg, self.distance.is_inverted)
