"""What a feature- or input-level Metrix step carries from the mixing to the loss."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class MixedBatch:
    """Mixed example k is mix(src_a[k], src_b[k], λ) = λ·h[src_a[k]] + (1−λ)·h[src_b[k]].

    inputs: the mixed tensor (K × ...), or None when the mixing happens inside the network
        (see `metrix_ops.mixup.mixing_hook`).
    pairs: the scheme that built it ("pos_neg", "anchor_neg", "pos_pos", "neg_neg"); the
        loss uses it to decide which anchors each mixed example is a candidate of.
    """

    src_a: torch.Tensor
    src_b: torch.Tensor
    lam: float
    pairs: str
    labels_a: torch.Tensor
    labels_b: torch.Tensor
    inputs: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return int(self.src_a.numel())

    def soft_labels(self, num_classes: int) -> torch.Tensor:
        """K × C class mass: λ·onehot(label_a) + (1−λ)·onehot(label_b)."""
        oh = torch.nn.functional.one_hot
        return self.lam * oh(self.labels_a, num_classes).float() + \
            (1 - self.lam) * oh(self.labels_b, num_classes).float()
