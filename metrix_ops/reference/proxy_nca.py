"""ProxyNCALoss (Movshovitz-Attias et al. 2017) with the ProxyNCA++ options, PML's
semantics: per example −log Σ_{proxy of its class} softmax(−scale · d²(x, proxies)),
examples whose probability underflows to 0 dropped (as PML), miner weights multiply;
mean reduced. ProxyNCA++: `temperature` T divides the logits (scale = softmax_scale / T);
proxies and embeddings are L2-normalised by the default distance, as PML does."""
from __future__ import annotations

import torch

from ..distances import LpDistance
from ..reducers import MeanReducer
from ..spec import LossInputs, register_loss
from .proxy_anchor import check_proxies, miner_weights


def _default_distance():
    return LpDistance(power=2)


@register_loss("ProxyNCALoss", _default_distance, MeanReducer, supports_ref_emb=False)
def proxy_nca_loss_dict(inp: LossInputs, proxies, softmax_scale=1.0, temperature=None):
    x, labels = inp.embeddings, inp.labels
    check_proxies(proxies, x, labels)
    proxies = proxies.to(x.dtype)
    scale = softmax_scale / temperature if temperature is not None else softmax_scale
    w = miner_weights(inp.indices_tuple, len(x), x.dtype, x.device, anchors_only=True)
    mat = inp.distance(x, proxies)
    if not inp.distance.is_inverted:
        mat = -mat
    same = torch.nn.functional.one_hot(labels, proxies.shape[0]).to(x.dtype)
    prob = (torch.softmax(scale * mat, dim=1) * same).sum(1)
    keep = prob != 0
    losses = -torch.log(prob[keep]) * w[keep]
    return {"loss": {"losses": losses, "indices": torch.arange(len(x), device=x.device)[keep],
                     "reduction_type": "element"}}
