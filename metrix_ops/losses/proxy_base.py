"""Proxy losses own their proxies (one learnable row per class), initialised as PML does."""
from __future__ import annotations

import numbers

import torch

from ..regularizers import _term, check_regularizer
from .base import BaseMetricLoss


class ProxyLossBase(BaseMetricLoss):
    init = staticmethod(torch.nn.init.normal_)  # PML's default weight init

    def __init__(self, num_classes: int, embedding_size: int, *args, weight_regularizer=None,
                 weight_reg_weight=1, weight_init_func=None, **kwargs):
        super().__init__(*args, **kwargs)
        for name, v in (("num_classes", num_classes), ("embedding_size", embedding_size)):
            if not isinstance(v, numbers.Integral) or isinstance(v, bool):
                raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")
        if num_classes < 1 or embedding_size < 1:
            raise ValueError(f"num_classes and embedding_size must be >= 1, got "
                             f"{num_classes} and {embedding_size}")
        check_regularizer("weight_regularizer", weight_regularizer, weight_reg_weight)
        if weight_init_func is not None and not callable(weight_init_func):
            raise TypeError(f"weight_init_func must be a callable that fills the proxies in "
                            f"place (e.g. torch.nn.init.xavier_normal_), got "
                            f"{type(weight_init_func).__name__}")
        self.num_classes = num_classes
        self.proxies = torch.nn.Parameter(torch.empty(num_classes, embedding_size))
        # PML's WeightMixin: weight_init_func(proxies), else the loss's default init
        self.weight_init_func = weight_init_func or self.init
        self.weight_init_func(self.proxies)
        # PML's WeightRegularizerMixin: weight · regularizer(proxies) added to the loss
        self.weight_regularizer = weight_regularizer
        self.weight_reg_weight = weight_reg_weight
        if weight_regularizer is not None:
            self.add_to_recordable_attributes(name="weight_reg_weight")

    def cast_types(self, dtype, device):
        """PML's: the proxies moved and cast in place (the same Parameter)."""
        self.proxies.data = self.proxies.data.to(device=device, dtype=dtype)

    def get_logits(self, embeddings):
        """PML's: the loss's distance (similarity) of each embedding to each proxy, B × C,
        e.g. to classify by the nearest proxy. The proxies are taken in the embeddings'
        dtype and device for the product, not cast in place."""
        return self.distance(embeddings, self.proxies.to(embeddings))

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels) -> dict:
        """PML's loss dict, with its weight_reg_loss entry when a weight_regularizer is set
        (PML's proxy losses add it in compute_loss, so a subclass's override sees it)."""
        loss_dict = super().compute_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        if self.weight_regularizer is not None:
            loss_dict["weight_reg_loss"] = {
                "losses": _term("weight_regularizer", self.weight_regularizer, self.proxies,
                                self.weight_reg_weight),
                "indices": None, "reduction_type": "already_reduced"}
        return loss_dict

    def loss_params(self):
        return {**super().loss_params(), "proxies": self.proxies}

    def forward(self, embeddings, *args, **kwargs):
        # PML's cast_types: proxies left on another device follow the embeddings (in place,
        # the same Parameter), so a loss that was never .to(device)-ed still runs
        dev = embeddings.device if torch.is_tensor(embeddings) else None
        if (dev is not None and self.proxies.device != dev and dev.type != "meta"
                and self.proxies.device.type != "meta"):
            self.proxies.data = self.proxies.data.to(dev)
        return super().forward(embeddings, *args, **kwargs)
