from __future__ import annotations

import torch

from ..distances import LpDistance
from ..reference.pairs import match_masks
from .base import BaseMiner


def batch_hard(mat, pos, neg, inverted: bool):
    """(a, p, n): for each anchor with a positive and a negative, its hardest positive
    (farthest) and hardest negative (closest).

    As PML's BatchEasyHardMiner(HARD, HARD): the excluded entries are pushed to ±finfo.max
    and the row's max/min taken, so on ties the lowest index wins (torch.max/min), and
    anchors lacking a positive or a negative are dropped; anchors come out ascending."""
    big = torch.finfo(mat.dtype).max
    if inverted:  # similarities: the hardest positive is the least similar
        p = mat.masked_fill(~pos, big).min(1).indices
        n = mat.masked_fill(~neg, -big).max(1).indices
    else:
        p = mat.masked_fill(~pos, -big).max(1).indices
        n = mat.masked_fill(~neg, big).min(1).indices
    a = torch.where(pos.any(1) & neg.any(1))[0]
    return a, p[a], n[a]


class BatchHardMiner(BaseMiner):
    """Batch-hard triplets (Hermans et al. 2017), PML's BatchHardMiner: one (a, p, n) per
    anchor. LpDistance by default; ref_emb/ref_labels as in PML (self pairs excluded only
    when the reference labels are the batch labels)."""

    default_distance = LpDistance

    def mine(self, x, labels, ref, ref_labels, same_set):
        pos, neg = match_masks(labels, ref_labels, same_set)
        return batch_hard(self.distance(x, ref), pos, neg, self.distance.is_inverted)
