"""Numbers of positive and negative pairs of a call, without listing the pairs: what the
fused ops' callers need for PML's "no pairs, no loss" rules."""
from __future__ import annotations

import torch

from .. import _ext

HAS_CPU_OP = _ext.has_op("pair_counts")  # csrc/cpu/pair_counts_cpu.cpp

if HAS_CPU_OP:
    @torch.library.register_fake("metrix_ops::pair_counts")
    def _fake(labels, ref_labels, same_set):
        return labels.new_empty(()), labels.new_empty(())


def cpu_op(labels, ref_labels) -> bool:
    """Whether the counts come from the compiled CPU op: one op where the PyTorch form below
    is seven, most of their cost at small batches."""
    return (HAS_CPU_OP and labels.device.type == "cpu" and ref_labels.device.type == "cpu"
            and labels.dtype == torch.int64 and ref_labels.dtype == torch.int64)


def pair_count_tensors(labels, ref_labels, same_set):
    """(#positive pairs, #negative pairs) as 0-d int64 tensors. Each label's matches among
    the sorted reference labels come from two binary searches: O((B+M) log M), any int64
    label values, static shapes (so it traces under torch.compile(fullgraph=True))."""
    if cpu_op(labels, ref_labels):
        return torch.ops.metrix_ops.pair_counts(labels, ref_labels, bool(same_set))
    ref_sorted = torch.sort(ref_labels).values
    per_row = (torch.searchsorted(ref_sorted, labels, right=True)
               - torch.searchsorted(ref_sorted, labels))
    matches = per_row.sum()
    pos = matches - (labels.shape[0] if same_set else 0)
    neg = labels.shape[0] * ref_labels.shape[0] - matches
    return pos, neg


def class_counts(labels, num_classes: int):
    """Examples per class id in [0, num_classes) (int64), the labels checked in range: a
    scatter of ones, where torch.bincount on CUDA reads the labels' min and max on the host
    (two syncs) to size its output."""
    counts = labels.new_zeros(num_classes, dtype=torch.int64)
    return counts.index_add_(0, labels, torch.ones_like(labels, dtype=torch.int64))
