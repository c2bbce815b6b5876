from .base import BaseMetricLoss


class LiftedStructureLoss(BaseMetricLoss):
    """PML's LiftedStructureLoss: per positive pair (a, p),
    ½[log Σ_{negatives of a or p} e^{neg_margin − d} + d(a,p) − pos_margin]₊² (Lp distance;
    mean over positive pairs)."""

    loss_name = "LiftedStructureLoss"
    defaults = {"neg_margin": 1.0, "pos_margin": 0.0}
    recorded = ("pos_margin", "neg_margin")
