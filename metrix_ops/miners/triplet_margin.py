from __future__ import annotations

from ..distances import LpDistance
from ..reference.pairs import all_triplets
from .base import BaseMiner

TYPES = ("all", "hard", "semihard", "easy")


class TripletMarginMiner(BaseMiner):
    """PML's TripletMarginMiner: of all triplets, those with margin(d_an − d_ap) ≤ margin
    ("all"), and ≤ 0 ("hard") or > 0 ("semihard"); "easy" is the complement of "all"."""

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
