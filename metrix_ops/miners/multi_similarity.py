from __future__ import annotations

import torch

from ..distances import CosineSimilarity
from .base import BaseMiner


class MultiSimilarityMiner(BaseMiner):
    """MS pair mining (Wang et al. 2019), PML's rule. With a similarity s: keep the positive
    (a, p) when s_ap − ε < max_n s_an (harder than the hardest negative, up to ε), and the
    negative (a, n) when s_an + ε > min_p s_ap; mirrored for distances. Returns PML's index
    tuple (a1, p, a2, n); the same pairs as PML's miner (PML orders them by row, then by
    value — compare them as sets)."""

    default_distance = CosineSimilarity

    def __init__(self, epsilon=0.1, distance=None):
        super().__init__(distance)
        self.epsilon = epsilon

    def mine(self, x, labels, ref, ref_labels, same_set):
        same = labels[:, None] == ref_labels[None, :]
        is_pos, is_neg = same.clone(), ~same
        if ref_labels is labels:  # PML drops self pairs by *labels* identity ...
            is_pos.fill_diagonal_(False)
        if not is_pos.any() or not is_neg.any():
            e = torch.empty(0, dtype=torch.long, device=x.device)
            return e, e.clone(), e.clone(), e.clone()
        # PML quirk, kept for parity: the candidates searched are "not a negative" for the
        # positives and "not a positive" for the negatives, and the diagonal is removed from
        # both by *embedding* identity (`embeddings is ref_emb`). The two identities agree
        # in the usual calls (no ref_emb; or ref_emb with other labels). When ref_emb is
        # another tensor but ref_labels is labels, the self pair (a, a) is neither positive
        # nor negative, so PML searches it on both sides: it may come back as a hard positive
        # *and* a hard negative, and it takes part in the hardest-pair thresholds.
        pos_cand, neg_cand = ~is_neg, ~is_pos
        if x is ref:
            pos_cand.fill_diagonal_(False)
            neg_cand.fill_diagonal_(False)

        mat = self.distance(x, ref)
        big = torch.finfo(mat.dtype).max  # PML's ±inf fill: finfo.max/min of the dtype
        if self.distance.is_inverted:
            hardest_neg = mat.masked_fill(~neg_cand, -big).amax(1, keepdim=True)
            hardest_pos = mat.masked_fill(~pos_cand, big).amin(1, keepdim=True)
            keep_pos = pos_cand & (mat - self.epsilon < hardest_neg)
            keep_neg = neg_cand & (mat + self.epsilon > hardest_pos)
        else:
            hardest_neg = mat.masked_fill(~neg_cand, big).amin(1, keepdim=True)
            hardest_pos = mat.masked_fill(~pos_cand, -big).amax(1, keepdim=True)
            keep_pos = pos_cand & (mat + self.epsilon > hardest_neg)
            keep_neg = neg_cand & (mat - self.epsilon < hardest_pos)
        a1, p = torch.where(keep_pos)
        a2, n = torch.where(keep_neg)
        return a1, p, a2, n
