"""Numbers of positive and negative pairs of a call, from label histograms: what the fused
ops' callers need for PML's "no pairs, no loss" rules without listing the pairs."""
from __future__ import annotations

import torch


def pair_counts(labels, ref_labels, same_set):
    """(#positive pairs, #negative pairs) without forming them: from label histograms over
    the labels that occur (any int64 values, so no allocation sized by the label range)."""
    _, ids = torch.unique(torch.cat([labels, ref_labels]), return_inverse=True)
    k = int(ids.max()) + 1 if ids.numel() else 1
    a = torch.bincount(ids[: len(labels)], minlength=k)
    b = torch.bincount(ids[len(labels):], minlength=k)
    matches = int((a * b).sum())
    pos = matches - (len(labels) if same_set else 0)
    neg = len(labels) * len(ref_labels) - matches
    return pos, neg
