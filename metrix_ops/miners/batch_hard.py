from __future__ import annotations

import torch

from ..distances import LpDistance
from ..reference.pairs import match_masks
from .base import BaseMiner, resolve_same_set
from .row_blocks import (BLOCK_ENTRIES, block_diagonal, block_rows, distance_row_blocks,
                         same_distance)


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

    def mine(self, x, labels, ref, ref_labels, same_set=None):
        same_set = resolve_same_set(same_set, labels, ref_labels)
        return batch_hard_streaming(self.distance, x, ref, labels, ref_labels, same_set,
                                    entries=self.block_entries)

    def mine_dense(self, x, labels, ref, ref_labels, same_set):
        """The reference: the rule on the whole B×M matrix at once."""
        pos, neg = match_masks(labels, ref_labels, same_set)
        return batch_hard(self.distance(x, ref), pos, neg, self.distance.is_inverted)
