from .base import BaseMetricLoss


class NPairsLoss(BaseMetricLoss):
    """PML's NPairsLoss(): one positive pair per label (PML's first pair for it), then
    cross-entropy of each anchor over the kept pairs' positives. DotProductSimilarity by
    default, which L2-normalises as in PML; MeanReducer; no ref_emb."""

    loss_name = "NPairsLoss"
    defaults = {}
