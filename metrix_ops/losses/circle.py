from .base import BaseMetricLoss


class CircleLoss(BaseMetricLoss):
    """PML's CircleLoss (pair labels; cosine similarity; AvgNonZero)."""

    loss_name = "CircleLoss"
    defaults = {"m": 0.4, "gamma": 80.0}
