from ..reference.triplet_margin import check_triplets_per_anchor
from .base import BaseMetricLoss


class TripletMarginLoss(BaseMetricLoss):
    """PML's TripletMarginLoss(margin=0.05, swap=False, smooth_loss=False,
    triplets_per_anchor="all"): [margin(d_ap, d_an) + m]₊ over all triplets, the mined
    ones (indices_tuple), or `triplets_per_anchor` random ones per anchor; AvgNonZero.
    LpDistance by default; any distance, ref_emb/ref_labels and labels=None with an
    indices_tuple are accepted as in PML."""

    loss_name = "TripletMarginLoss"
    defaults = {"margin": 0.05, "swap": False, "smooth_loss": False, "triplets_per_anchor": "all"}
    recorded = ("margin",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        check_triplets_per_anchor(self.triplets_per_anchor)
