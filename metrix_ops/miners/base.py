"""PML-style miners: `miner(embeddings, labels, ref_emb=None, ref_labels=None)` returns an
index tuple, computed without gradient. These are the reference (they hold a B×M matrix);
the fused engines run the same rules inside the loss op."""
from __future__ import annotations

import torch

from ..distances import as_distance
from ..validation import check_loss_inputs


class BaseMiner(torch.nn.Module):
    default_distance = None

    def __init__(self, distance=None):
        super().__init__()
        self.distance = as_distance(distance, self.default_distance)

    def forward(self, embeddings, labels, ref_emb=None, ref_labels=None):
        check_loss_inputs(embeddings, labels, None, ref_emb, ref_labels)
        same_set = ref_emb is None or ref_labels is labels
        if ref_emb is None:
            ref_emb, ref_labels = embeddings, labels
        with torch.no_grad():
            return self.mine(embeddings, labels, ref_emb, ref_labels, same_set)

    def mine(self, embeddings, labels, ref_emb, ref_labels, same_set):
        raise NotImplementedError
