from __future__ import annotations

import torch

from ..distances import CosineSimilarity
from .base import BaseMiner, resolve_same_set
from .row_blocks import block_diagonal, block_rows, distance_row_blocks


def ms_candidates(labels, ref_labels, drop_self_pos: bool, drop_self_both: bool, start=0,
                  n_rows=None):
    """(is_pos, is_neg, pos_cand, neg_cand) for the rows [start, start + n_rows).

    PML quirk, kept for parity: the candidates searched are "not a negative" for the
    positives and "not a positive" for the negatives. The diagonal leaves the positives by
    *labels* identity (drop_self_pos: `ref_labels is labels`) but leaves both candidate
    sets by *embedding* identity (drop_self_both: `embeddings is ref_emb`). The two agree
    in the usual calls (no ref_emb; or ref_emb with other labels). When ref_emb is another
    tensor but ref_labels is labels, the self pair (a, a) is neither positive nor negative,
    so PML searches it on both sides: it may come back as a hard positive *and* a hard
    negative, and it takes part in the hardest-pair thresholds."""
    n_rows = len(labels) - start if n_rows is None else n_rows
    same = labels[start:start + n_rows, None] == ref_labels[None, :]
    is_pos, is_neg = same.clone(), ~same
    diag = block_diagonal(start, n_rows, len(ref_labels), same.device)
    if drop_self_pos:
        is_pos[diag] = False
    pos_cand, neg_cand = ~is_neg, ~is_pos
    if drop_self_both:
        pos_cand[diag] = False
        neg_cand[diag] = False
    return is_pos, is_neg, pos_cand, neg_cand


def ms_keep(mat, pos_cand, neg_cand, epsilon, inverted: bool):
    """PML's rule on rows of the matrix: (keep_pos, keep_neg) masks."""
    big = torch.finfo(mat.dtype).max  # PML's ±inf fill: finfo.max/min of the dtype
    if inverted:
        hardest_neg = mat.masked_fill(~neg_cand, -big).amax(1, keepdim=True)
        hardest_pos = mat.masked_fill(~pos_cand, big).amin(1, keepdim=True)
        return (pos_cand & (mat - epsilon < hardest_neg),
                neg_cand & (mat + epsilon > hardest_pos))
    hardest_neg = mat.masked_fill(~neg_cand, big).amin(1, keepdim=True)
    hardest_pos = mat.masked_fill(~pos_cand, -big).amax(1, keepdim=True)
    return (pos_cand & (mat + epsilon > hardest_neg),
            neg_cand & (mat - epsilon < hardest_pos))


def in_value_order(keep, mat):
    """(rows, cols) of the kept entries, row by row and, within a row, by the matrix's value
    ascending (ties by column): the order of PML's miner, which reads its pairs off each
    row's sorted values."""
    r, c = torch.where(keep)
    order = torch.sort(mat[r, c], stable=True).indices
    order = order[torch.sort(r[order], stable=True).indices]
    return r[order], c[order]


def _empty(device):
    e = torch.empty(0, dtype=torch.long, device=device)
    return e, e.clone(), e.clone(), e.clone()


class MultiSimilarityMiner(BaseMiner):
    """MS pair mining (Wang et al. 2019), PML's rule. With a similarity s: keep the positive
    (a, p) when s_ap − ε < max_n s_an (harder than the hardest negative, up to ε), and the
    negative (a, n) when s_an + ε > min_p s_ap; mirrored for distances. Returns PML's index
    tuple (a1, p, a2, n) in PML's order: row by row, within a row by value ascending (ties,
    which PML's unstable sort leaves open, by column). The bounds are per row, so one pass
    over row blocks of the matrix finds both bounds and the kept pairs."""

    default_distance = CosineSimilarity

    def __init__(self, epsilon=0.1, distance=None, collect_stats: bool = False):
        super().__init__(distance, collect_stats)
        self.epsilon = epsilon
        self.add_to_recordable_attributes(name="epsilon", is_stat=False)

    def mine(self, x, labels, ref, ref_labels, same_set=None):
        same_set = resolve_same_set(same_set, labels, ref_labels)
        rows = block_rows(len(ref), self.block_entries)
        a1, p, a2, n = [], [], [], []
        any_pos = any_neg = False
        for start, mat in distance_row_blocks(self.distance, x, ref, rows):
            is_pos, is_neg, pos_cand, neg_cand = ms_candidates(
                labels, ref_labels, ref_labels is labels, x is ref, start, len(mat))
            any_pos = any_pos or bool(is_pos.any())
            any_neg = any_neg or bool(is_neg.any())
            keep_pos, keep_neg = ms_keep(mat, pos_cand, neg_cand, self.epsilon,
                                         self.distance.is_inverted)
            for keep, rows_out, cols_out in ((keep_pos, a1, p), (keep_neg, a2, n)):
                r, c = in_value_order(keep, mat)
                rows_out.append(r + start)
                cols_out.append(c)
        # PML returns nothing unless the whole batch has a positive and a negative pair
        if not (any_pos and any_neg):
            return _empty(x.device)
        return tuple(torch.cat(t) for t in (a1, p, a2, n))

    def mine_dense(self, x, labels, ref, ref_labels, same_set):
        """The reference: the rule on the whole B×M matrix at once."""
        is_pos, is_neg, pos_cand, neg_cand = ms_candidates(labels, ref_labels,
                                                           ref_labels is labels, x is ref)
        if not is_pos.any() or not is_neg.any():
            return _empty(x.device)
        mat = self.distance(x, ref)
        keep_pos, keep_neg = ms_keep(mat, pos_cand, neg_cand, self.epsilon,
                                     self.distance.is_inverted)
        return in_value_order(keep_pos, mat) + in_value_order(keep_neg, mat)
