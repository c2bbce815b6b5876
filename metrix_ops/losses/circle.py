from .base import BaseMetricLoss


class CircleLoss(BaseMetricLoss):
    """PML's CircleLoss (pair labels; cosine similarity; AvgNonZero)."""

    loss_name = "CircleLoss"
    defaults = {"m": 0.4, "gamma": 80.0}
    recorded = ("m", "gamma", "op", "on", "delta_p", "delta_n")

    # PML's attributes for the optima and margins of the two sides (read by its records)
    op = property(lambda self: 1 + self.m)
    on = property(lambda self: -self.m)
    delta_p = property(lambda self: 1 - self.m)
    delta_n = property(lambda self: self.m)
