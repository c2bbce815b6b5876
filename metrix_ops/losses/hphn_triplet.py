from ..reducers import MeanReducer, SumReducer
from .base import BaseMetricLoss


class HPHNTripletLoss(BaseMetricLoss):
    """The EE paper's batch-hard triplet (hard positive, hard negative pair).

    reduction: "mean" over anchors (default) or "sum" (with margin=1e-5 this reproduces
    the official runs). With `expansion=mo.Expansion(n)` the hardest negative pair ranges
    over synthetic points too; with none it is PML's batch-hard triplet."""

    loss_name = "HPHNTripletLoss"
    defaults = {"margin": 0.2}

    def __init__(self, *args, reduction: str = "mean", **kwargs):
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if "reducer" in kwargs:
            raise TypeError("HPHNTripletLoss takes reduction=, not reducer=")
        super().__init__(*args, reducer=MeanReducer() if reduction == "mean" else SumReducer(),
                         **kwargs)
        self.reduction = reduction
