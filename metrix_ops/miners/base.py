"""PML-style miners: `miner(embeddings, labels, ref_emb=None, ref_labels=None)` returns an
index tuple, computed without gradient. They stream row blocks of the distance matrix
(`row_blocks`), never the B×M matrix; `mine_dense` keeps each rule on the whole matrix as
the reference. The fused engines run the same rules inside the loss op (the option miner=)."""
from __future__ import annotations

import torch

from ..distances import as_distance
from ..validation import check_loss_inputs, pml_label_pair
from .row_blocks import BLOCK_ENTRIES


class BaseMiner(torch.nn.Module):
    default_distance = None
    # entries of one row block of the distance matrix the streaming miners hold at a time
    block_entries = BLOCK_ENTRIES

    def __init__(self, distance=None, collect_stats: bool = False):
        super().__init__()
        self.distance = as_distance(distance, self.default_distance)
        # PML's flag, taken for drop-in calls: the counts below are kept either way (as PML
        # keeps them); PML's other per-call statistics are not recorded
        self.collect_stats = collect_stats
        self._count(())

    def forward(self, embeddings, labels, ref_emb=None, ref_labels=None):
        return self._count(self._call(self.mine, embeddings, labels, ref_emb, ref_labels))

    def _count(self, tup):
        """PML's counts of the last call's output (read by training loops for logging):
        num_triplets of a triplet tuple, num_pos_pairs and num_neg_pairs of a pair tuple,
        the others 0."""
        if torch.compiler.is_compiling():  # the sizes are data-dependent there
            return tup
        self.num_triplets = len(tup[0]) if len(tup) == 3 else 0
        self.num_pos_pairs = len(tup[0]) if len(tup) == 4 else 0
        self.num_neg_pairs = len(tup[2]) if len(tup) == 4 else 0
        return tup

    def reference(self, embeddings, labels, ref_emb=None, ref_labels=None):
        """The same call through `mine_dense`, the rule on the whole B×M matrix (tests)."""
        return self._call(self.mine_dense, embeddings, labels, ref_emb, ref_labels)

    def _call(self, mine, embeddings, labels, ref_emb, ref_labels):
        same_set = ref_emb is None or ref_labels is labels
        # PML's miners move the labels to the embeddings' device (ref_labels to ref_emb's)
        # and take float labels
        labels, ref_labels = pml_label_pair(labels, ref_labels, embeddings, ref_emb)
        check_loss_inputs(embeddings, labels, None, ref_emb, ref_labels)
        if ref_emb is None:
            ref_emb, ref_labels = embeddings, labels
        with torch.no_grad():
            return mine(embeddings, labels, ref_emb, ref_labels, same_set)

    def mine(self, embeddings, labels, ref_emb, ref_labels, same_set):
        raise NotImplementedError

    def mine_dense(self, embeddings, labels, ref_emb, ref_labels, same_set):
        raise NotImplementedError
