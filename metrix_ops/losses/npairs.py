from .base import BaseMetricLoss


class NPairsLoss(BaseMetricLoss):
    """PML's NPairsLoss (one positive pair per label; dot-product similarity)."""

    loss_name = "NPairsLoss"
    defaults = {}
