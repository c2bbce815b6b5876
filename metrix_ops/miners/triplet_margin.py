from __future__ import annotations

import torch

from ..distances import LpDistance
from ..reference.pairs import all_triplets
from ..host_read import host_list
from .base import BaseMiner, resolve_same_set
from .batch_hard import block_masks
from .row_blocks import block_rows, distance_row_blocks

TYPES = ("all", "hard", "semihard", "easy")


def triplet_keep(gap, margin, type_of_triplets: str):
    """PML's condition on the gaps g = margin(d_an, d_ap): which triplets are kept."""
    if type_of_triplets == "easy":
        return gap > margin
    keep = gap <= margin
    if type_of_triplets == "hard":
        keep &= gap <= 0
    elif type_of_triplets == "semihard":
        keep &= gap > 0
    return keep


class TripletStats:
    """PML's collect_stats statistics of TripletMarginMiner, the means over all triplets of
    d_ap, d_an and the gap margin(d_an, d_ap), from row blocks: a row's positive distance
    appears once per negative of the row, and a negative's once per positive, so
    Σ_triplets d_ap = Σ_rows #neg · Σ_pos d_ap (and the same for d_an), and the mean gap is
    the difference of the two means. NaN without triplets, as PML's mean of nothing.
    Accumulated in fp64."""

    def __init__(self, inverted: bool):
        self.inverted = inverted
        self.sums = None

    def add(self, mat, pos, neg):
        m = mat.double()
        n_pos, n_neg = pos.sum(1, dtype=torch.float64), neg.sum(1, dtype=torch.float64)
        block = torch.stack([(n_neg * (m * pos).sum(1)).sum(), (n_pos * (m * neg).sum(1)).sum(),
                             (n_pos * n_neg).sum()])
        self.sums = block if self.sums is None else self.sums + block

    def record(self, miner):
        ap, an, count = host_list(self.sums) if self.sums is not None else (0.0, 0.0, 0.0)
        ap, an = (ap / count, an / count) if count else (float("nan"), float("nan"))
        miner.pos_pair_dist, miner.neg_pair_dist = ap, an
        miner.avg_triplet_margin = ap - an if self.inverted else an - ap


class TripletMarginMiner(BaseMiner):
    """PML's TripletMarginMiner(margin=0.2, type_of_triplets="all"). With
    g = margin(d_an, d_ap) (d_an − d_ap for a distance, s_ap − s_an for a similarity), of
    all triplets it keeps g ≤ margin ("all": the margin is violated), additionally g ≤ 0
    ("hard": the negative is at least as close as the positive) or g > 0 ("semihard"), or
    g > margin ("easy", the complement of "all"). Triplets in PML's order (row-major over
    anchor, positive, negative).

    Streams row blocks of the distance matrix; the candidates of a few rows at a time are
    their (rows × P_max × M) grid of positive and reference columns, within the miner's
    block_entries (at least one row: P_max × M), besides the output (which holds the kept
    triplets: the miner's contract, possibly large)."""

    default_distance = LpDistance

    def __init__(self, margin=0.2, type_of_triplets="all", distance=None,
                 collect_stats: bool = False):
        super().__init__(distance, collect_stats)
        if type_of_triplets not in TYPES:
            raise ValueError(f"type_of_triplets must be one of {TYPES}, got {type_of_triplets!r}")
        self.margin = margin
        self.type_of_triplets = type_of_triplets
        self.add_to_recordable_attributes(list_of_names=["margin"], is_stat=False)
        self.add_to_recordable_attributes(
            list_of_names=["avg_triplet_margin", "pos_pair_dist", "neg_pair_dist"],
            is_stat=True)

    def _gap(self, ap, an):
        return ap - an if self.distance.is_inverted else an - ap

    def mine(self, x, labels, ref, ref_labels, same_set=None):
        same_set = resolve_same_set(same_set, labels, ref_labels)
        m = len(ref)
        out = []
        stats = TripletStats(self.distance.is_inverted) if self.collect_stats else None
        for start, mat in distance_row_blocks(self.distance, x, ref,
                                              block_rows(m, self.block_entries)):
            pos, neg = block_masks(labels, ref_labels, same_set, start, len(mat))
            if stats is not None:
                stats.add(mat, pos, neg)
            # each row's positive columns, ascending, padded with M up to the block's most
            width = int(pos.sum(1).max()) if len(pos) else 0
            if width == 0:
                continue
            cols = torch.where(pos, torch.arange(m, device=pos.device), m)
            cols = cols.sort(1).values[:, :width]
            ap = mat.gather(1, cols.clamp(max=m - 1))
            # sub-blocks of rows whose (rows × width × M) grid of candidates fits the budget
            step = block_rows(width * m, self.block_entries)
            for s in range(0, len(mat), step):
                sl = slice(s, s + step)
                # g[r, k, n] elementwise as PML's mat[a, p] and mat[a, n] over its triplets
                keep = triplet_keep(self._gap(ap[sl, :, None], mat[sl, None, :]),
                                    self.margin, self.type_of_triplets)
                keep &= (cols[sl] < m)[:, :, None] & neg[sl, None, :]
                r, k, n = torch.where(keep)  # row-major: anchor, positive, negative
                out.append((r + (start + s), cols[sl][r, k], n))
        if stats is not None:
            stats.record(self)
        if not out:
            e = torch.empty(0, dtype=torch.long, device=x.device)
            return e, e.clone(), e.clone()
        return tuple(torch.cat(t) for t in zip(*out))

    def mine_dense(self, x, labels, ref, ref_labels, same_set):
        """The reference: every triplet's gap from the whole B×M matrix."""
        a, p, n = all_triplets(labels, ref_labels, same_set)
        mat = self.distance(x, ref)
        if self.collect_stats:
            ap, an = mat[a, p], mat[a, n]
            gap = self._gap(ap, an)
            self.pos_pair_dist, self.neg_pair_dist, self.avg_triplet_margin = (
                ap.mean().item(), an.mean().item(), gap.mean().item())
        keep = triplet_keep(self._gap(mat[a, p], mat[a, n]), self.margin,
                            self.type_of_triplets)
        return a[keep], p[keep], n[keep]
