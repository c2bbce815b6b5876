"""What a feature- or input-level Metrix step carries from the mixing to the loss."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from ..config import METRIX_PAIRS


@dataclass
class MixedBatch:
    """Mixed example k is mix(src_a[k], src_b[k], λ_k) = λ_k·h[src_a[k]] + (1−λ_k)·h[src_b[k]]
    of rows of the clean batch, with the label mix λ_k·[y = labels_a[k]] + (1−λ_k)·[y = labels_b[k]].

    src_a, src_b: 1-D integer index tensors (K,) into the clean batch.
    lam: one λ for every mix (a float, as the official code: one draw per step) or a
        per-row tensor (K,); each λ in [0, 1].
    pairs: the scheme that chose the pairs ("pos_neg", "anchor_neg", "pos_pos", "neg_neg");
        the loss uses it to decide which clean anchors each mixed example is a candidate
        of (see metrix_ops.reference.metrix), and it must match the loss's Metrix(pairs=).
    labels_a, labels_b: the class labels of the two sources (labels[src_a], labels[src_b]).
    inputs: the mixed tensor (K × ...), or None when the mixing happens inside the network
        (see `metrix_ops.mixup.mixing_hook`).
    """

    src_a: torch.Tensor
    src_b: torch.Tensor
    lam: Union[float, torch.Tensor]
    pairs: str
    labels_a: torch.Tensor
    labels_b: torch.Tensor
    inputs: Optional[torch.Tensor] = None

    def __post_init__(self):
        for name in ("src_a", "src_b", "labels_a", "labels_b"):
            t = getattr(self, name)
            if not torch.is_tensor(t) or t.ndim != 1 or t.is_floating_point() or t.dtype == torch.bool:
                raise TypeError(f"MixedBatch.{name} must be a 1-D integer tensor")
        k = self.src_a.numel()
        if any(getattr(self, n).numel() != k for n in ("src_b", "labels_a", "labels_b")):
            raise ValueError("MixedBatch.src_a, src_b, labels_a and labels_b must have equal lengths")
        if k and int(min(self.src_a.min(), self.src_b.min())) < 0:
            raise ValueError("MixedBatch.src_a/src_b hold negative indices")
        if self.pairs not in METRIX_PAIRS:
            raise ValueError(f"MixedBatch.pairs must be one of {METRIX_PAIRS}, got {self.pairs!r}")
        lam = self.lam
        if torch.is_tensor(lam) and lam.ndim == 0:
            lam = float(lam)
        if torch.is_tensor(lam):
            if lam.ndim != 1 or lam.numel() != k or not lam.is_floating_point():
                raise ValueError(f"a per-row MixedBatch.lam must be a 1-D float tensor of length {k}")
            if k and not bool(((lam >= 0) & (lam <= 1)).all()):
                raise ValueError("MixedBatch.lam values must be in [0, 1]")
        else:
            lam = float(lam)
            if not 0.0 <= lam <= 1.0:
                raise ValueError(f"MixedBatch.lam must be in [0, 1], got {lam}")
        self.lam = lam

    def __len__(self) -> int:
        return int(self.src_a.numel())

    def lam_column(self, like: torch.Tensor, ndim: int = 2) -> Union[float, torch.Tensor]:
        """λ broadcastable against a K × ... tensor of `ndim` dims (a float stays a float)."""
        if not torch.is_tensor(self.lam):
            return self.lam
        return self.lam.to(device=like.device, dtype=like.dtype).reshape((-1,) + (1,) * (ndim - 1))

    def mix(self, h: torch.Tensor) -> torch.Tensor:
        """λ·h[src_a] + (1−λ)·h[src_b] of a B × ... tensor (integer inputs become float)."""
        if not h.is_floating_point():
            h = h.float()
        lam = self.lam_column(h, h.ndim)
        # index_select, not h[idx]: the backward of advanced indexing (index_put_ with
        # accumulate) adds repeated rows in a thread-dependent order on the CPU, so the same
        # seed would not give the same numbers; index_select's backward (index_add_) does.
        a = torch.index_select(h, 0, self.src_a.to(h.device))
        b = torch.index_select(h, 0, self.src_b.to(h.device))
        return lam * a + (1 - lam) * b

    def soft_labels(self, num_classes: int, dtype=torch.float32) -> torch.Tensor:
        """K × C class mass: λ·onehot(labels_a) + (1−λ)·onehot(labels_b)."""
        oh = torch.nn.functional.one_hot
        a = oh(self.labels_a, num_classes).to(dtype)
        lam = self.lam_column(a)
        return lam * a + (1 - lam) * oh(self.labels_b, num_classes).to(dtype)
