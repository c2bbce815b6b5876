import torch

from .base import BaseMetricLoss


class NPairsLoss(BaseMetricLoss):
    """PML's NPairsLoss(): one positive pair per label (PML's first pair for it), then
    cross-entropy of each anchor over the kept pairs' positives. DotProductSimilarity by
    default, which L2-normalises as in PML; MeanReducer; no ref_emb.

    `num_pairs` is PML's statistic, the number of pairs kept by the last call. It is counted
    when read, from the call's labels: counting in the call would cost a host sync on a GPU
    for a number most training loops never read."""

    loss_name = "NPairsLoss"
    defaults = {}

    def __init__(self, *args, **kwargs):
        self._num_pairs, self._pairs_of = 0, None
        super().__init__(*args, **kwargs)
        self.add_to_recordable_attributes(name="num_pairs", is_stat=True)

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None,
                ref_labels=None, **options):
        self.num_pairs = 0  # PML's reset_stats at the start of a call
        loss = super().forward(embeddings, labels, indices_tuple, ref_emb, ref_labels,
                               **options)
        if not torch.compiler.is_compiling():
            self._pairs_of = (labels, indices_tuple)
        return loss

    @property
    def num_pairs(self):
        if self._pairs_of is not None:
            self._num_pairs, self._pairs_of = kept_pair_count(*self._pairs_of), None
        return self._num_pairs

    @num_pairs.setter
    def num_pairs(self, value):
        self._num_pairs, self._pairs_of = value, None


def kept_pair_count(labels, indices_tuple) -> int:
    """PML's len(anchor_idx) after convert_to_pos_pairs_with_unique_labels: the number of
    distinct labels among the positive pairs' anchors (every label with two rows or more
    when no indices_tuple is given)."""
    labels = torch.as_tensor(labels)
    if indices_tuple is None:
        anchor_labels = torch.sort(labels).values
        repeated = anchor_labels[1:] == anchor_labels[:-1]
        # a label has a positive pair when its run is at least two long: count run starts
        # that repeat
        starts = torch.ones_like(repeated)
        starts[1:] = ~repeated[:-1]
        return int((repeated & starts).sum())
    a, p = indices_tuple[0], indices_tuple[1]
    if len(a) == 0:
        return 0
    anchor_labels = torch.sort(labels[torch.as_tensor(a, device=labels.device)]).values
    return int((anchor_labels[1:] != anchor_labels[:-1]).sum()) + 1
