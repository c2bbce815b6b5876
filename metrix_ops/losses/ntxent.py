from .base import BaseMetricLoss


class NTXentLoss(BaseMetricLoss):
    """PML's NTXentLoss (InfoNCE over each positive pair and the anchor's negatives)."""

    loss_name = "NTXentLoss"
    defaults = {"temperature": 0.07}
