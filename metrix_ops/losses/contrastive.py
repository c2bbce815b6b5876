from .base import BaseMetricLoss


class ContrastiveLoss(BaseMetricLoss):
    """PML's ContrastiveLoss: [d(a,p) - pos_margin]₊ and [neg_margin - d(a,n)]₊ (Lp distance;
    with a similarity the margins flip as in PML). Default reducer AvgNonZero per sub-loss."""

    loss_name = "ContrastiveLoss"

    def __init__(self, pos_margin=0.0, neg_margin=1.0, **kwargs):
        super().__init__(**kwargs)
        self.pos_margin = pos_margin
        self.neg_margin = neg_margin

    def loss_params(self):
        return {"pos_margin": self.pos_margin, "neg_margin": self.neg_margin}
