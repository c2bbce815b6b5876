import torch

from .proxy_base import ProxyLossBase


class ProxyNCALoss(ProxyLossBase):
    """PML's ProxyNCALoss(num_classes, embedding_size, softmax_scale=1): owns `proxies`
    (standard-normal init, as PML); LpDistance(power=2), which normalises embeddings and
    proxies; MeanReducer. ProxyNCA++ options, PML's behaviour when left at None:
    `temperature` divides the logits; `normalize_proxies` True/False forces the proxies to
    be L2-normalised / left raw whatever the distance does to the embeddings."""

    loss_name = "ProxyNCALoss"
    defaults = {"softmax_scale": 1.0, "temperature": None, "normalize_proxies": None}
    recorded = ("softmax_scale", "num_classes")

    @property
    def proxy_labels(self):
        """PML's attribute: proxy c stands for class c (a CPU tensor, as PML keeps it)."""
        return torch.arange(self.num_classes)
