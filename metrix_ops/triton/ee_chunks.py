"""The chunk table of the Triton engine's Embedding Expansion kernels and the checks on their
inputs. The EE kernels (ee_neg_lse.py, ee_triplet.py) keep whole classes in a chunk, since an
anchor's side points are the points of its segments and their selection matrix needs both
endpoints among the chunk's rows; so classes are at most EE_MAX_CLASS rows there. (The Metrix
kernels cut larger classes into blocks instead: metrix_tiles.chunk_table.)"""
from __future__ import annotations

import torch

from .launch import next_pow2

EE_MAX_CLASS = 64


def class_chunks(sorted_labels: torch.Tensor):
    """(chunk starts with the end appended, int32; KB): whole classes of the sorted labels
    packed greedily into chunks of at most KB rows, KB the smallest power of two ≥ 16 that
    holds the largest class. For the EE kernels (ee_neg_lse.py), whose selection matrices need
    an anchor's segments inside its chunk: a class over EE_MAX_CLASS rows raises (covers() sends
    such a batch to the next engine eagerly; under compile it cannot read the labels)."""
    counts = torch.unique_consecutive(sorted_labels, return_counts=True)[1].tolist()
    biggest = max(counts, default=1)
    if biggest > EE_MAX_CLASS:
        raise ValueError(
            f"labels: the Triton engine's Embedding Expansion kernels take classes of at most "
            f"{EE_MAX_CLASS} rows, and this batch has a larger class. Outside torch.compile such a "
            "batch goes to the next engine; under it the engine is chosen without the labels' "
            "values: use backend='cuda' or 'cpu' for such batches, or call the loss outside "
            "the compiled region")
    kb = max(16, next_pow2(biggest))
    starts, row = [0], 0
    for c in counts:
        if row + c - starts[-1] > kb:
            starts.append(row)
        row += c
    starts.append(row)
    return torch.tensor(starts, dtype=torch.int32, device=sorted_labels.device), kb


def check_segment_labels(labels, seg_i, seg_j) -> None:
    """EE's segments are positive pairs: both ends rows of the batch with one label. Checked in
    the ops (eagerly, whatever n), where a compiled module cannot check them before the op
    (pairs="adjacent" on a batch that is not class-contiguous), as the CPU ops check them."""
    if len(seg_i) == 0:
        return
    b = len(labels)
    ends = torch.cat([seg_i, seg_j])
    if int(ends.min()) < 0 or int(ends.max()) >= b:
        raise ValueError(f"seg_i and seg_j must be rows of the batch, in [0, {b})")
    bad = torch.nonzero(labels[seg_i] != labels[seg_j])
    if len(bad):
        e = int(bad[0, 0])
        raise ValueError(f"Embedding Expansion's segment ({int(seg_i[e])}, {int(seg_j[e])}) joins "
                         "rows of different labels: segments are positive pairs (with "
                         "pairs='adjacent', rows 2t and 2t+1 of a class-contiguous batch)")


def largest_class_fits(labels) -> bool:
    """Every class has at most EE_MAX_CLASS rows (the EE kernels' bound); True under
    torch.compile, which cannot look (the EE ops raise there: class_chunks)."""
    if len(labels) == 0 or torch.compiler.is_compiling():
        return True
    return int(torch.unique(labels, return_counts=True)[1].max()) <= EE_MAX_CLASS
