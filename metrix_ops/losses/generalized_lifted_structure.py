from .base import BaseMetricLoss


class GeneralizedLiftedStructureLoss(BaseMetricLoss):
    """PML's GeneralizedLiftedStructureLoss: per anchor
    [log Σ_P e^{d − pos_margin} + log Σ_N e^{neg_margin − d}]₊ (Lp distance; mean over anchors)."""

    loss_name = "GeneralizedLiftedStructureLoss"
    defaults = {"neg_margin": 1.0, "pos_margin": 0.0}
    recorded = ("pos_margin", "neg_margin")
