from .base import BaseMetricLoss


class MultiSimilarityLoss(BaseMetricLoss):
    """PML's MultiSimilarityLoss (cosine similarity; mean over anchors)."""

    loss_name = "MultiSimilarityLoss"
    defaults = {"alpha": 2.0, "beta": 50.0, "base": 0.5}
