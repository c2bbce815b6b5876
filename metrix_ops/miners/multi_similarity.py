from __future__ import annotations

import torch

from ..distances import CosineSimilarity
from ..reference.pairs import match_masks
from .base import BaseMiner


class MultiSimilarityMiner(BaseMiner):
    """MS pair mining (Wang et al. 2019), PML's rule with similarity s: keep positive (a,p)
    when s_ap − ε < max_n s_an, and negative (a,n) when s_an + ε > min_p s_ap (mirrored
    for distances). Returns (a1, p, a2, n)."""

    default_distance = CosineSimilarity

    def __init__(self, epsilon=0.1, distance=None):
        super().__init__(distance)
        self.epsilon = epsilon

    def mine(self, x, labels, ref, ref_labels, same_set):
        pos, neg = match_masks(labels, ref_labels, same_set)
        if not pos.any() or not neg.any():
            e = torch.empty(0, dtype=torch.long, device=x.device)
            return e, e.clone(), e.clone(), e.clone()
        mat = self.distance(x, ref)
        inv = self.distance.is_inverted
        inf = torch.finfo(mat.dtype).max
        # the hardest negative / hardest positive of each row (±inf where a row has none)
        hardest_neg = (mat.masked_fill(~neg, -inf).max(1).values if inv
                       else mat.masked_fill(~neg, inf).min(1).values)[:, None]
        hardest_pos = (mat.masked_fill(~pos, inf).min(1).values if inv
                       else mat.masked_fill(~pos, -inf).max(1).values)[:, None]
        if inv:
            keep_pos = pos & (mat - self.epsilon < hardest_neg)
            keep_neg = neg & (mat + self.epsilon > hardest_pos)
        else:
            keep_pos = pos & (mat + self.epsilon > hardest_neg)
            keep_neg = neg & (mat - self.epsilon < hardest_pos)
        a1, p = torch.where(keep_pos)
        a2, n = torch.where(keep_neg)
        return a1, p, a2, n
