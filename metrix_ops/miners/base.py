"""PML-style miners: `miner(embeddings, labels, ref_emb=None, ref_labels=None)` returns an
index tuple, computed without gradient. They stream row blocks of the distance matrix
(`row_blocks`), never the B×M matrix; `mine_dense` keeps each rule on the whole matrix as
the reference. The fused engines run the same rules inside the loss op (the option miner=)."""
from __future__ import annotations

import torch

from ..distances import as_distance
from ..validation import check_loss_inputs
from .row_blocks import BLOCK_ENTRIES


class BaseMiner(torch.nn.Module):
    default_distance = None
    # entries of one row block of the distance matrix the streaming miners hold at a time
    block_entries = BLOCK_ENTRIES

    def __init__(self, distance=None):
        super().__init__()
        self.distance = as_distance(distance, self.default_distance)

    def forward(self, embeddings, labels, ref_emb=None, ref_labels=None):
        return self._call(self.mine, embeddings, labels, ref_emb, ref_labels)

    def reference(self, embeddings, labels, ref_emb=None, ref_labels=None):
        """The same call through `mine_dense`, the rule on the whole B×M matrix (tests)."""
        return self._call(self.mine_dense, embeddings, labels, ref_emb, ref_labels)

    def _call(self, mine, embeddings, labels, ref_emb, ref_labels):
        check_loss_inputs(embeddings, labels, None, ref_emb, ref_labels)
        same_set = ref_emb is None or ref_labels is labels
        if ref_emb is None:
            ref_emb, ref_labels = embeddings, labels
        with torch.no_grad():
            return mine(embeddings, labels, ref_emb, ref_labels, same_set)

    def mine(self, embeddings, labels, ref_emb, ref_labels, same_set):
        raise NotImplementedError

    def mine_dense(self, embeddings, labels, ref_emb, ref_labels, same_set):
        raise NotImplementedError
