from .proxy_base import ProxyLossBase


class ProxyNCALoss(ProxyLossBase):
    """PML's ProxyNCALoss(num_classes, embedding_size, softmax_scale=1), plus ProxyNCA++'s
    `temperature` (logits divided by it; None = PML's behaviour)."""

    loss_name = "ProxyNCALoss"
    defaults = {"softmax_scale": 1.0, "temperature": None}
