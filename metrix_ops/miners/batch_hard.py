from __future__ import annotations

import torch

from ..distances import LpDistance
from ..reference.pairs import match_masks
from ..host_read import host_list
from .base import BaseMiner, resolve_same_set
from .row_blocks import (BLOCK_ENTRIES, block_diagonal, block_rows, distance_row_blocks,
                         same_distance)


HARD_STATS = ("easiest_triplet", "hardest_triplet", "easiest_pos_pair", "hardest_pos_pair",
              "easiest_neg_pair", "hardest_neg_pair")


def batch_hard(mat, pos, neg, inverted: bool):
    """(a, p, n): for each anchor with a positive and a negative, its hardest positive
    (farthest) and hardest negative (closest).

    As PML's BatchEasyHardMiner(HARD, HARD): the excluded entries are pushed to ±finfo.max
    and the row's max/min taken, so on ties the lowest index wins (torch.max/min), and
    anchors lacking a positive or a negative are dropped; anchors come out ascending."""
    big = torch.finfo(mat.dtype).max
    if inverted:  # similarities: the hardest positive is the least similar
        p = mat.masked_fill(~pos, big).min(1).indices
        n = mat.masked_fill(~neg, -big).max(1).indices
    else:
        p = mat.masked_fill(~pos, -big).max(1).indices
        n = mat.masked_fill(~neg, big).min(1).indices
    a = torch.where(pos.any(1) & neg.any(1))[0]
    return a, p[a], n[a]


def block_masks(labels, ref_labels, same_set: bool, start: int, n_rows: int):
    """match_masks for the rows [start, start + n_rows) only."""
    pos = labels[start:start + n_rows, None] == ref_labels[None, :]
    neg = ~pos
    if same_set:
        pos[block_diagonal(start, n_rows, len(ref_labels), pos.device)] = False
    return pos, neg


@torch.no_grad()
def batch_hard_streaming(distance, x, ref, labels, ref_labels, same_set: bool,
                         value_distance=None, entries: int = BLOCK_ENTRIES):
    """batch_hard over row blocks of the distance matrix: the same (a, p, n), memory
    O(rows · M). With value_distance, also (v_ap, v_an): that distance's values at the
    chosen pairs, exactly the entries of its full matrix (the loss of the fused path reads
    them; None: the miner's own). No graph: the values come back detached."""
    rows = block_rows(len(ref), entries)
    blocks = distance_row_blocks(distance, x, ref, rows)
    values = (None if value_distance is None or same_distance(value_distance, distance)
              else distance_row_blocks(value_distance, x, ref, rows))
    out = []
    for start, mat in blocks:
        pos, neg = block_masks(labels, ref_labels, same_set, start, len(mat))
        a, p, n = batch_hard(mat, pos, neg, distance.is_inverted)
        found = [a + start, p, n]
        if value_distance is not None:
            vals = mat if values is None else next(values)[1]
            found += [vals[a, p], vals[a, n]]
        out.append(found)
    if not out:  # B = 0
        e = torch.empty(0, dtype=torch.long, device=x.device)
        out = [[e, e, e] + ([x.new_empty(0)] * 2 if value_distance is not None else [])]
    return tuple(torch.cat(t) for t in zip(*out))


class BatchHardMiner(BaseMiner):
    """Batch-hard triplets (Hermans et al. 2017), PML's BatchHardMiner: one (a, p, n) per
    anchor. LpDistance by default; ref_emb/ref_labels as in PML (self pairs excluded only
    when the reference labels are the batch labels). Streams row blocks of the distance
    matrix (`row_blocks`): never the B×M matrix."""

    default_distance = LpDistance

    def __init__(self, distance=None, collect_stats: bool = False):
        super().__init__(distance, collect_stats)
        self.add_to_recordable_attributes(list_of_names=list(HARD_STATS), is_stat=True)

    def mine(self, x, labels, ref, ref_labels, same_set=None):
        same_set = resolve_same_set(same_set, labels, ref_labels)
        if not self.collect_stats:
            return batch_hard_streaming(self.distance, x, ref, labels, ref_labels, same_set,
                                        entries=self.block_entries)
        a, p, n, d_ap, d_an = batch_hard_streaming(
            self.distance, x, ref, labels, ref_labels, same_set, value_distance=self.distance,
            entries=self.block_entries)
        self._set_stats(d_ap, d_an)
        return a, p, n

    def mine_dense(self, x, labels, ref, ref_labels, same_set):
        """The reference: the rule on the whole B×M matrix at once."""
        pos, neg = match_masks(labels, ref_labels, same_set)
        mat = self.distance(x, ref)
        a, p, n = batch_hard(mat, pos, neg, self.distance.is_inverted)
        if self.collect_stats:
            self._set_stats(mat[a, p], mat[a, n])
        return a, p, n

    def _set_stats(self, d_ap, d_an):
        """PML's BatchEasyHardMiner statistics (collect_stats) of the kept anchors' picks:
        the extremes of d_ap − d_an, d_ap and d_an, easiest and hardest by the distance's
        direction (a similarity's hardest positive is its smallest); left at 0 without
        anchors, as PML leaves them."""
        if len(d_ap) == 0:
            return
        low_is_hard = self.distance.is_inverted
        gap = d_ap - d_an
        values = host_list(torch.stack([gap.min(), gap.max(), d_ap.min(), d_ap.max(),
                                        d_an.min(), d_an.max()]))
        lo_gap, hi_gap, lo_ap, hi_ap, lo_an, hi_an = values
        # (easiest, hardest) of the triplet gap and the positives, (easiest, hardest) of the
        # negatives: a distance's hard positive is far, its hard negative near
        pairs = ((hi_gap, lo_gap), (hi_ap, lo_ap), (lo_an, hi_an)) if low_is_hard else (
            (lo_gap, hi_gap), (lo_ap, hi_ap), (hi_an, lo_an))
        for name, value in zip(HARD_STATS, [v for pair in pairs for v in pair]):
            setattr(self, name, value)
