from .base import BaseMetricLoss


class TripletMarginLoss(BaseMetricLoss):
    """PML's TripletMarginLoss (all triplets by default; AvgNonZero)."""

    loss_name = "TripletMarginLoss"
    defaults = {"margin": 0.05, "swap": False, "smooth_loss": False, "triplets_per_anchor": "all"}
