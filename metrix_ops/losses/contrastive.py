from .base import BaseMetricLoss


class ContrastiveLoss(BaseMetricLoss):
    """PML's ContrastiveLoss: [d(a,p) − pos_margin]₊ and [neg_margin − d(a,n)]₊ (Lp distance;
    with a similarity the margins flip as in PML). Default reducer AvgNonZero per sub-loss."""

    loss_name = "ContrastiveLoss"
    defaults = {"pos_margin": 0.0, "neg_margin": 1.0}
