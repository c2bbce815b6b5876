import torch

from .proxy_base import ProxyLossBase


def _kaiming_fan_out(w):
    # PML's default for ProxyAnchorLoss: normal with std sqrt(2 / num_classes)
    return torch.nn.init.kaiming_normal_(w, mode="fan_out")


class ProxyAnchorLoss(ProxyLossBase):
    """PML's ProxyAnchorLoss(num_classes, embedding_size, margin=0.1, alpha=32): owns
    `proxies` (num_classes × embedding_size, initialised as PML); cosine similarity,
    log-sum-exp terms, DivisorReducer. indices_tuple reweights examples as in PML."""

    loss_name = "ProxyAnchorLoss"
    defaults = {"margin": 0.1, "alpha": 32.0}
    recorded = ("num_classes", "alpha", "margin")
    init = staticmethod(_kaiming_fan_out)
