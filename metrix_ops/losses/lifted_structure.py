from .base import BaseMetricLoss


class LiftedStructureLoss(BaseMetricLoss):
    """PML's LiftedStructureLoss (per positive pair; Lp distance)."""

    loss_name = "LiftedStructureLoss"
    defaults = {"neg_margin": 1.0, "pos_margin": 0.0}


class GeneralizedLiftedStructureLoss(BaseMetricLoss):
    """PML's GeneralizedLiftedStructureLoss (per anchor; Lp distance)."""

    loss_name = "GeneralizedLiftedStructureLoss"
    defaults = {"neg_margin": 1.0, "pos_margin": 0.0}
