from ..reducers import MeanReducer, SumReducer
from .base import BaseMetricLoss

REDUCTIONS = {"mean": MeanReducer, "sum": SumReducer}


def reduction_reducer(reduction: str):
    """The reducer for HPHN's `reduction=` ("mean" or "sum" over the anchors that have a
    positive and a negative)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"HPHNTripletLoss reduction must be 'mean' or 'sum', got {reduction!r}")
    return REDUCTIONS[reduction]()


class HPHNTripletLoss(BaseMetricLoss):
    """The Embedding Expansion paper's triplet loss with hard positive and hard negative
    (pair) mining: [d(x_i, farthest positive) − d(closest negative pair) + margin]₊ per
    anchor with a positive and a negative, averaged ("mean") or summed ("sum"; with
    margin=1e-5 this is the official training setting).

    Without `expansion=` it is batch-hard triplet and equals PML's
    `TripletMarginLoss(margin, reducer=MeanReducer())` on `BatchHardMiner()` triplets
    (LpDistance on normalised embeddings by default; any PML-style `distance=` and
    ref_emb/ref_labels as PML). With `expansion=mo.Expansion(n_points, pairs, normalize)`
    the hardest negative is the closest pair between x_i plus the synthetic points on its
    segments and every original or synthetic point of another class.
    `reduction` replaces PML's `reducer=`."""

    loss_name = "HPHNTripletLoss"
    defaults = {"margin": 0.2}

    def __init__(self, margin=0.2, reduction: str = "mean", **kwargs):
        if "reducer" in kwargs:
            raise TypeError("HPHNTripletLoss takes reduction='mean'|'sum', not reducer=")
        super().__init__(margin=margin, reducer=reduction_reducer(reduction), **kwargs)
        self.reduction = reduction

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, reduction={self.reduction!r}"
