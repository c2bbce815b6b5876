"""Proxy losses own their proxies (one learnable row per class), initialised as PML does."""
from __future__ import annotations

import torch

from .base import BaseMetricLoss


class ProxyLossBase(BaseMetricLoss):
    init = staticmethod(torch.nn.init.normal_)  # PML's default weight init

    def __init__(self, num_classes: int, embedding_size: int, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if num_classes < 1 or embedding_size < 1:
            raise ValueError(f"num_classes and embedding_size must be >= 1, got "
                             f"{num_classes} and {embedding_size}")
        self.num_classes = num_classes
        self.proxies = torch.nn.Parameter(torch.empty(num_classes, embedding_size))
        self.init(self.proxies)

    def loss_params(self):
        return {**super().loss_params(), "proxies": self.proxies}
