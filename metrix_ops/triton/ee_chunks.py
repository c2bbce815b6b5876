"""The chunk table of the Triton engine's Embedding Expansion kernels and the checks on their
inputs. The EE kernels (ee_neg_lse.py, ee_triplet.py) keep each segment's two ends in one
chunk, since an anchor's side points are the points of its segments and their selection
matrix needs both endpoints among the chunk's rows: with pairs="all" whole classes, so classes
of at most EE_MAX_CLASS rows; with "adjacent" pairs of rows, so any class. (The Metrix kernels
cut larger classes into blocks instead: metrix_tiles.chunk_table.)"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .launch import next_pow2
from ..host_read import host_list

EE_MAX_CLASS = 64


class Units(NamedTuple):
    chunks: torch.Tensor  # chunk starts with the end appended, int32
    kb: int               # rows per chunk at most
    most_ends: int        # the most segments any row is an end of


def unit_chunks(sorted_labels: torch.Tensor, seg_u: torch.Tensor, seg_w: torch.Tensor) -> Units:
    """The chunk table of the label-sorted batch for the EE kernels (ee_neg_lse.py), whose
    selection matrices need both ends of each of a chunk's segments among its rows: the rows
    are cut into units, the shortest runs that no segment (u, w in sorted positions) crosses,
    packed greedily into chunks of at most KB rows, KB the smallest power of two ≥ 16 that
    holds the largest unit. With pairs="all" a unit is a whole class; with the official
    "adjacent" pairing, a pair of rows, so any class size fits. A unit over EE_MAX_CLASS rows
    raises (covers() sends such a batch to the next engine eagerly; under compile it cannot
    read the labels). Also the most segments a row is an end of (an anchor's side entries
    are itself and n per segment it ends: the kernels' side block).

    One host read, which also carries check_segment_labels' facts (the segments checked as
    there, before their ends index anything unclamped)."""
    b, dev = len(sorted_labels), sorted_labels.device
    lo, hi = torch.minimum(seg_u, seg_w).long(), torch.maximum(seg_u, seg_w).long()
    lo, hi = lo.clamp(0, max(b - 1, 0)), hi.clamp(0, max(b - 1, 0))  # a bad end: caught below
    # cover[p] > 0: some segment spans rows p−1 and p, so no unit may start at p
    cover = torch.zeros(b + 1, dtype=torch.int64, device=dev)
    ends_per_row = torch.zeros(b + 1, dtype=torch.int64, device=dev)
    if len(seg_u):
        one = torch.ones_like(lo)
        cover.index_add_(0, lo + 1, one)
        cover.index_add_(0, hi + 1, -one)
        ends_per_row.index_add_(0, torch.cat([lo, hi]), torch.cat([one, one]))
    facts = _segment_facts(sorted_labels, seg_u, seg_w)
    starts = torch.cumsum(cover, 0)[:b] == 0
    read = host_list(torch.cat([facts, ends_per_row.max().view(1), starts.long()]))
    _raise_on_bad_segments(read[:3], sorted_labels, seg_u, seg_w)
    most_ends, starts = read[3], [p for p, start in enumerate(read[4:]) if start]
    sizes = [e - a for a, e in zip(starts, starts[1:] + [b])]
    biggest = max(sizes, default=1)
    if biggest > EE_MAX_CLASS:
        raise ValueError(
            f"labels: the Triton engine's Embedding Expansion kernels take classes of at most "
            f"{EE_MAX_CLASS} rows with pairs='all' (any size with pairs='adjacent'), and this "
            "batch has a larger class. Outside torch.compile such a batch goes to the next "
            "engine; under it the engine is chosen without the labels' values: use "
            "backend='cuda' or 'cpu' for such batches, or call the loss outside the compiled "
            "region")
    kb = max(16, next_pow2(biggest))
    chunk_starts, row = [0], 0
    for c in sizes:
        if row + c - chunk_starts[-1] > kb:
            chunk_starts.append(row)
        row += c
    chunk_starts.append(row)
    return Units(torch.tensor(chunk_starts, dtype=torch.int32, device=dev), kb, most_ends)


def _segment_facts(labels, seg_i, seg_j) -> torch.Tensor:
    """[lowest end, highest end, 1 if some segment joins two labels else 0] on the device,
    for one host read; [0, 0, 0] without segments. Gathers through clamped indices: a bad end
    is caught by the range, not by an out-of-bounds read."""
    if len(seg_i) == 0:
        return torch.zeros(3, dtype=torch.int64, device=labels.device)
    b = len(labels)
    ends = torch.cat([seg_i, seg_j]).long()
    differ = labels[seg_i.clamp(0, b - 1)] != labels[seg_j.clamp(0, b - 1)]
    return torch.stack([ends.min(), ends.max(), differ.any().long()])


def _raise_on_bad_segments(facts, labels, seg_i, seg_j) -> None:
    lo, hi, mixed = facts
    b = len(labels)
    if len(seg_i) and (lo < 0 or hi >= b):
        raise ValueError(f"seg_i and seg_j must be rows of the batch, in [0, {b})")
    if mixed:
        differ = labels[seg_i] != labels[seg_j]
        e = int(torch.nonzero(differ)[0, 0])
        raise ValueError(f"Embedding Expansion's segment ({int(seg_i[e])}, {int(seg_j[e])}) joins "
                         "rows of different labels: segments are positive pairs (with "
                         "pairs='adjacent', rows 2t and 2t+1 of a class-contiguous batch)")


def check_segment_labels(labels, seg_i, seg_j) -> None:
    """EE's segments are positive pairs: both ends rows of the batch with one label. Checked in
    the ops (eagerly, whatever n), where a compiled module cannot check them before the op
    (pairs="adjacent" on a batch that is not class-contiguous), as the CPU ops check them.
    One host read (unit_chunks makes the same checks within its own)."""
    if len(seg_i):
        _raise_on_bad_segments(host_list(_segment_facts(labels, seg_i, seg_j)), labels, seg_i,
                               seg_j)


def largest_unit_fits(labels, pairs: str) -> bool:
    """Every unit of unit_chunks has at most EE_MAX_CLASS rows: always with pairs="adjacent"
    (a unit is a pair of rows); with "all" every class at most EE_MAX_CLASS rows. True under
    torch.compile, which cannot look (the EE ops raise there: unit_chunks)."""
    if pairs == "adjacent" or len(labels) == 0 or torch.compiler.is_compiling():
        return True
    ys = torch.sort(labels).values  # class sizes by binary search: one host read (unique's
    # output size would be a second)
    return int((torch.searchsorted(ys, ys, right=True) - torch.searchsorted(ys, ys)).max()) \
        <= EE_MAX_CLASS
