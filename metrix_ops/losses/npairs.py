import torch

from ..fused.npairs import pair_starts
from .base import BaseMetricLoss


class NPairsLoss(BaseMetricLoss):
    """PML's NPairsLoss(): one positive pair per label (PML's first pair for it), then
    cross-entropy of each anchor over the kept pairs' positives. DotProductSimilarity by
    default, which L2-normalises as in PML; MeanReducer; no ref_emb.

    `num_pairs` is PML's statistic, the number of pairs kept by the last call. The call keeps
    a copy of the labels it counts from (one small launch, no host sync); the count is made
    when read, which most training loops never do."""

    loss_name = "NPairsLoss"
    defaults = {}

    def __init__(self, *args, **kwargs):
        self._num_pairs = 0
        super().__init__(*args, **kwargs)
        self.add_to_recordable_attributes(name="num_pairs", is_stat=True)

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None,
                ref_labels=None, **options):
        self.num_pairs = 0  # PML's reset_stats at the start of a call
        loss = super().forward(embeddings, labels, indices_tuple, ref_emb, ref_labels,
                               **options)
        if not torch.compiler.is_compiling():  # (inside a graph nothing is recorded)
            ys = torch.as_tensor(labels, device=embeddings.device)
            if indices_tuple is not None:  # the labels of the tuple's positive pairs' anchors
                ys = ys[torch.as_tensor(indices_tuple[0], device=ys.device)]
            # a copy: the caller may reuse its label buffer before the count is read
            self._num_pairs = (ys.clone() if ys is labels else ys, indices_tuple is None)
        return loss

    @property
    def num_pairs(self):
        if isinstance(self._num_pairs, tuple):
            self._num_pairs = kept_pair_count(*self._num_pairs)
        return self._num_pairs

    @num_pairs.setter
    def num_pairs(self, value):
        self._num_pairs = value


def kept_pair_count(labels, whole_batch: bool) -> int:
    """PML's len(anchor_idx) after convert_to_pos_pairs_with_unique_labels: of the batch's
    labels, those with two rows or more; of an indices_tuple's anchors' labels, the distinct
    ones."""
    ys = torch.sort(labels).values
    if whole_batch:
        return int(pair_starts(ys).sum())
    return int((ys[1:] != ys[:-1]).sum()) + int(len(ys) > 0)
