"""Numbers of positive and negative pairs of a call, from label histograms: what the fused
ops' callers need for PML's "no pairs, no loss" rules without listing the pairs."""
from __future__ import annotations

import torch


def pair_counts(labels, ref_labels, same_set):
    """(#positive pairs, #negative pairs) without forming them: from label histograms."""
    k = int(max(labels.max(), ref_labels.max())) + 1 if labels.numel() and ref_labels.numel() else 1
    lo = min(int(labels.min()), int(ref_labels.min())) if labels.numel() and ref_labels.numel() else 0
    a = torch.bincount(labels - lo, minlength=k - lo)
    b = torch.bincount(ref_labels - lo, minlength=k - lo)
    pos = int((a * b).sum()) - (len(labels) if same_set else 0)
    neg = len(labels) * len(ref_labels) - int((a * b).sum())
    return pos, neg
