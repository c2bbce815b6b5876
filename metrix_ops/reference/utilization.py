"""Utilization (Metrix paper): u(Q, X) = (1/|Q|) Σ_q min_x ‖f(q) − f(x)‖².

Lower means the training embeddings sit closer to the test ones. Computed over row
chunks of Q so that only a chunk × |X| block exists at once.
"""
from __future__ import annotations

import torch

from ..validation import check_embeddings

__all__ = ["utilization"]


def utilization(test_embeddings: torch.Tensor, train_embeddings: torch.Tensor,
                chunk: int = 4096) -> torch.Tensor:
    check_embeddings(test_embeddings, "test_embeddings")
    check_embeddings(train_embeddings, "train_embeddings")
    if test_embeddings.shape[1] != train_embeddings.shape[1]:
        raise ValueError(f"test_embeddings has dim {test_embeddings.shape[1]} but "
                         f"train_embeddings has {train_embeddings.shape[1]}")
    if test_embeddings.device != train_embeddings.device:
        raise ValueError("test_embeddings and train_embeddings must be on the same device")
    acc = torch.float64 if test_embeddings.dtype == torch.float64 else torch.float32
    q, x = test_embeddings.to(acc), train_embeddings.to(acc)
    x_sq = (x * x).sum(1)
    total = torch.zeros((), dtype=acc, device=q.device)
    for start in range(0, q.shape[0], chunk):
        qc = q[start:start + chunk]
        # ‖q−x‖² = ‖q‖² + ‖x‖² − 2 q·x; clamp the rounding below zero away
        d2 = (qc * qc).sum(1, keepdim=True) + x_sq[None, :] - 2.0 * (qc @ x.t())
        total = total + d2.min(dim=1).values.clamp_min(0).sum()
    return total / q.shape[0]
