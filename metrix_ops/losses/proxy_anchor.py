import torch

from .proxy_base import ProxyLossBase


def _kaiming_fan_out(w):
    return torch.nn.init.kaiming_normal_(w, mode="fan_out")


class ProxyAnchorLoss(ProxyLossBase):
    """PML's ProxyAnchorLoss(num_classes, embedding_size, margin=0.1, alpha=32)."""

    loss_name = "ProxyAnchorLoss"
    defaults = {"margin": 0.1, "alpha": 32.0}
    init = staticmethod(_kaiming_fan_out)  # as PML
