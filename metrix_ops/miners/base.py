"""PML-style miners: `miner(embeddings, labels, ref_emb=None, ref_labels=None)` returns an
index tuple, computed without gradient. They stream row blocks of the distance matrix
(`row_blocks`), never the B×M matrix; `mine_dense` keeps each rule on the whole matrix as
the reference. The fused engines run the same rules inside the loss op (the option miner=)."""
from __future__ import annotations

import inspect

import torch

from ..distances import LpDistance, as_distance, record_norms
from ..validation import check_loss_inputs, pml_label_pair
from ..records import Records, lazy_stat
from .row_blocks import BLOCK_ENTRIES

COUNT_NAMES = ("num_triplets", "num_pos_pairs", "num_neg_pairs")


class BaseMiner(Records, torch.nn.Module):
    default_distance = LpDistance  # PML's default for a miner that names none
    # entries of one row block of the distance matrix the streaming miners hold at a time
    block_entries = BLOCK_ENTRIES
    _pml_mine = False  # mine() has PML's four arguments (no same_set): set per subclass

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._pml_mine = not _takes_same_set(cls.mine)

    def __init__(self, distance=None, collect_stats: bool = False):
        super().__init__()
        self.distance = as_distance(distance, self.default_distance)
        # a PML distance object given is converted; its statistics (collect_stats) are still
        # recorded on it, where the caller reads them
        object.__setattr__(self, "_given_distance", distance)
        # PML's flag: the counts below are kept either way (as PML keeps them); with it, the
        # miners that have more statistics in PML record them (TripletMarginMiner's mean
        # distances, BatchHardMiner's extremes)
        self.collect_stats = collect_stats
        self._counts = (0, 0, 0)
        self.add_to_recordable_attributes(
            list_of_names=["num_pos_pairs", "num_neg_pairs", "num_triplets"], is_stat=True)

    def forward(self, embeddings, labels, ref_emb=None, ref_labels=None):
        self.reset_stats()  # a PML-style miner's own statistics, as PML's forward
        mine = self.mine
        if self._pml_mine:  # written for PML: mine(emb, labels, ref, ref_labels)
            mine = _drop_same_set(mine)
        tup = self._count(self._check_output(
            self._call(mine, embeddings, labels, ref_emb, ref_labels)))
        # PML's miners call their distance on (embeddings, ref_emb); ours stream without it
        record_norms(stats_distance(self), embeddings, embeddings if ref_emb is None else ref_emb)
        return tup

    def _count(self, tup):
        """PML's counts of the last call's output (read by training loops for logging):
        num_triplets of a triplet tuple, num_pos_pairs and num_neg_pairs of a pair tuple,
        the others 0."""
        if not torch.compiler.is_compiling():  # the sizes are data-dependent there
            self._counts = ((len(tup[0]), 0, 0) if len(tup) == 3
                            else (0, len(tup[0]), len(tup[2])))
        return tup

    # Read lazily: a fused miner= call leaves its counts as device tensors (record_counts),
    # converted (one host sync) only when a training loop reads them. Settable, as PML's.
    num_triplets = lazy_stat("_counts", 0, 3)
    num_pos_pairs = lazy_stat("_counts", 1, 3)
    num_neg_pairs = lazy_stat("_counts", 2, 3)

    def _check_output(self, tup):
        """PML's output check, so that a custom mine() returning something else fails here,
        naming the miner, rather than inside a loss."""
        if torch.compiler.is_compiling():  # lengths are data-dependent there
            return tup
        name = type(self).__name__
        if not isinstance(tup, (tuple, list)) or len(tup) not in (3, 4) or not all(
                isinstance(t, torch.Tensor) and t.dim() == 1 for t in tup):
            raise TypeError(f"{name}.mine must return a tuple of 3 (anchors, positives, "
                            f"negatives) or 4 (a1, p, a2, n) 1-D index tensors")
        sizes = [len(t) for t in tup]
        if (len(tup) == 3 and len(set(sizes)) != 1) or (
                len(tup) == 4 and (sizes[0] != sizes[1] or sizes[2] != sizes[3])):
            raise ValueError(f"{name}.mine returned index tensors of lengths {sizes}: a "
                             f"triplet tuple needs three equal lengths, a pair tuple a1 == p "
                             f"and a2 == n")
        return tuple(tup)

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

    def mine(self, embeddings, labels, ref_emb, ref_labels, same_set=None):
        """The rule; `same_set` says the references are the batch itself (skip i == i; None:
        PML's test, ref_labels is labels). A subclass may define PML's
        mine(embeddings, labels, ref_emb, ref_labels) instead, and call ours with super()."""
        raise NotImplementedError

    def mine_dense(self, embeddings, labels, ref_emb, ref_labels, same_set):
        raise NotImplementedError


def _takes_same_set(mine) -> bool:
    """Whether the (unbound) mine takes ours five arguments: a parameter named same_set, or a
    fifth positional one without a default (a PML-style mine may add optional ones)."""
    params = inspect.signature(mine).parameters
    if "same_set" in params:
        return True
    positional = [p for p in params.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 6 and positional[5].default is inspect.Parameter.empty


def resolve_same_set(same_set, labels, ref_labels) -> bool:
    """same_set as given, or PML's test when a PML-style caller gave none."""
    return ref_labels is labels if same_set is None else bool(same_set)


def _drop_same_set(mine):
    return lambda x, labels, ref, ref_labels, same_set: mine(x, labels, ref, ref_labels)


def stats_distance(miner):
    """The distance object a miner's norm statistics go to: the one its caller gave (a PML
    distance, converted for the mining), else its own."""
    given = getattr(miner, "_given_distance", None)
    return given if given is not None else getattr(miner, "distance", None)


def mined_counts(miner) -> tuple:
    """(triplets, positive pairs, negative pairs) of the miner's last call as held, device
    tensors unread (a fused miner= call's)."""
    if isinstance(miner, BaseMiner):
        return miner.__dict__.get("_counts", (0, 0, 0))
    return tuple(getattr(miner, n, 0) for n in COUNT_NAMES)


def record_counts(miner, triplets=0, pos_pairs=0, neg_pairs=0):
    """The counts PML's miner would have set, for a miner whose rule ran inside a fused loss
    op (the loss option miner=): ints or 0-dim tensors, read lazily by our miners; a PML
    miner object gets ints (its attributes are plain)."""
    if torch.compiler.is_compiling():
        return
    counts = (triplets, pos_pairs, neg_pairs)
    if isinstance(miner, BaseMiner):
        miner._counts = counts
    else:
        for name, c in zip(COUNT_NAMES, counts):
            setattr(miner, name, int(c))
