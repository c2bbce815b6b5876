from .base import BaseMetricLoss


class SupConLoss(BaseMetricLoss):
    """PML's SupConLoss (supervised contrastive; AvgNonZero over anchors)."""

    loss_name = "SupConLoss"
    defaults = {"temperature": 0.1}
