from __future__ import annotations

from ..distances import LpDistance
from ..reference.pairs import all_triplets
from .base import BaseMiner

TYPES = ("all", "hard", "semihard", "easy")


class TripletMarginMiner(BaseMiner):
    """PML's TripletMarginMiner(margin=0.2, type_of_triplets="all"). With
    g = margin(d_an, d_ap) (d_an − d_ap for a distance, s_ap − s_an for a similarity), of
    all triplets it keeps g ≤ margin ("all": the margin is violated), additionally g ≤ 0
    ("hard": the negative is at least as close as the positive) or g > 0 ("semihard"), or
    g > margin ("easy", the complement of "all"). Triplets in PML's order (row-major over
    anchor, positive, negative)."""

    default_distance = LpDistance

    def __init__(self, margin=0.2, type_of_triplets="all", distance=None):
        super().__init__(distance)
        if type_of_triplets not in TYPES:
            raise ValueError(f"type_of_triplets must be one of {TYPES}, got {type_of_triplets!r}")
        self.margin = margin
        self.type_of_triplets = type_of_triplets

    def mine(self, x, labels, ref, ref_labels, same_set):
        a, p, n = all_triplets(labels, ref_labels, same_set)
        mat = self.distance(x, ref)
        ap, an = mat[a, p], mat[a, n]
        gap = ap - an if self.distance.is_inverted else an - ap
        if self.type_of_triplets == "easy":
            keep = gap > self.margin
        else:
            keep = gap <= self.margin
            if self.type_of_triplets == "hard":
                keep &= gap <= 0
            elif self.type_of_triplets == "semihard":
                keep &= gap > 0
        return a[keep], p[keep], n[keep]
