"""The module base class: PML's call signature, our options, one path through `run_loss`."""
from __future__ import annotations

from typing import Optional

import torch

from ..config import Expansion, Metrix
from ..driver import run_loss


class BaseMetricLoss(torch.nn.Module):
    """Subclasses set `loss_name` (the registry key, PML's class name) and implement
    `loss_params()` returning the loss's own hyper-parameters (and proxies, if any)."""

    loss_name: str = ""

    def __init__(self, distance=None, reducer=None, backend: str = "auto",
                 metrix: Optional[Metrix] = None, expansion: Optional[Expansion] = None):
        super().__init__()
        self.distance = distance
        self.reducer = reducer
        self.backend = backend
        self.metrix = metrix
        self.expansion = expansion

    def loss_params(self) -> dict:
        raise NotImplementedError

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None,
                ref_labels=None, *, lam=None, mixed_embeddings=None, mixed=None):
        return run_loss(self.loss_name, self.loss_params(), embeddings, labels, indices_tuple,
                        ref_emb, ref_labels, distance=self.distance, reducer=self.reducer,
                        backend=self.backend, metrix=self.metrix, expansion=self.expansion,
                        lam=lam, mixed_embeddings=mixed_embeddings, mixed=mixed)

    def extra_repr(self) -> str:
        parts = [f"{k}={v!r}" for k, v in self.loss_params().items() if not torch.is_tensor(v)]
        parts += [f"backend={self.backend!r}"]
        if self.metrix is not None:
            parts.append(f"metrix={self.metrix!r}")
        if self.expansion is not None:
            parts.append(f"expansion={self.expansion!r}")
        return ", ".join(parts)
