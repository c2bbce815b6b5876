import torch

from .base import BaseMetricLoss


class NPairsLoss(BaseMetricLoss):
    """PML's NPairsLoss(): one positive pair per label (PML's first pair for it), then
    cross-entropy of each anchor over the kept pairs' positives. DotProductSimilarity by
    default, which L2-normalises as in PML; MeanReducer; no ref_emb.

    `num_pairs` is PML's statistic, the number of pairs kept by the last call: counted in the
    call as a device tensor (a few small launches, no host sync), converted when read."""

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
            self._num_pairs = kept_pair_count(torch.as_tensor(labels, device=embeddings.device),
                                              indices_tuple)
        return loss

    @property
    def num_pairs(self):
        if torch.is_tensor(self._num_pairs):
            self._num_pairs = int(self._num_pairs)
        return self._num_pairs

    @num_pairs.setter
    def num_pairs(self, value):
        self._num_pairs = value


def kept_pair_count(labels, indices_tuple) -> torch.Tensor:
    """PML's len(anchor_idx) after convert_to_pos_pairs_with_unique_labels, as a 0-d tensor:
    the number of distinct labels among the positive pairs' anchors (every label with two
    rows or more when no indices_tuple is given)."""
    if indices_tuple is None:
        ys = torch.sort(labels).values
        repeated = ys[1:] == ys[:-1]
        # a label has a positive pair when its run is at least two long: count run starts
        # that repeat
        starts = torch.ones_like(repeated)
        starts[1:] = ~repeated[:-1]
        return (repeated & starts).sum()
    a = torch.as_tensor(indices_tuple[0], device=labels.device)
    ys = torch.sort(labels[a]).values
    return (ys[1:] != ys[:-1]).sum() + int(len(a) > 0)
