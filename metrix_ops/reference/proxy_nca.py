"""ProxyNCALoss (Movshovitz-Attias et al. 2017) with PML's semantics, plus the ProxyNCA++
options (Teh et al. 2020).

Per example x with label y (PML's NCA computation with the proxies as references):

    loss(x) = −log Σ_{c: c = y} softmax_c(scale · (−d(x, P_c)))      (d: squared L2 by default)

mean reduced. ProxyNCA++ options, off by default so that the loss is PML's:
- `temperature` T: the logits are divided by T (scale = softmax_scale / T).
- `normalize_proxies`: None (default) leaves normalisation to the distance, which treats
  embeddings and proxies alike; PML's default LpDistance(power=2) has
  normalize_embeddings=True, so by default PML (and we) already use unit embeddings *and*
  unit proxies, i.e. ProxyNCA++'s normalised proxies. True L2-normalises the proxies even
  under a distance that does not normalise; False keeps them raw even under one that
  normalises the embeddings.

PML quirks reproduced:
- an example whose probability underflows to exactly 0 is dropped (not an infinite
  loss); if all are dropped the mean of nothing is NaN, as in PML.
- indices_tuple does not select terms: each example's loss is multiplied by its count
  among the tuple's *anchors* (a of triplets, a1 and a2 of pairs) over the largest count,
  because for PML the proxies are the references; examples never used as anchors get 0.
- unlike NCALoss, a batch of one example is not a zero loss.
- ref_emb is not supported.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..distances import LpDistance
from ..reducers import MeanReducer
from ..spec import LossInputs, register_loss
from .proxy_anchor import check_proxies, miner_weights


def _default_distance():
    return LpDistance(power=2)


def distance_to_raw_refs(distance, x, refs):
    """The distance matrix with the distance's own treatment of the queries (normalised or
    not, then its power) but the references used exactly as given."""
    mat = distance.compute_mat(distance.maybe_normalize(x), refs)
    return mat ** distance.power if distance.power != 1 else mat


def logit_scale(softmax_scale, temperature, normalize_proxies) -> float:
    """The logits' factor, softmax_scale / temperature, after checking the ++ options."""
    if temperature is not None and not temperature > 0:
        raise ValueError(f"temperature must be > 0 (or None), got {temperature}")
    if normalize_proxies not in (None, True, False):
        raise ValueError(f"normalize_proxies must be None, True or False, got {normalize_proxies!r}")
    return softmax_scale / temperature if temperature is not None else softmax_scale


@register_loss("ProxyNCALoss", _default_distance, MeanReducer, supports_ref_emb=False)
def proxy_nca_loss_dict(inp: LossInputs, proxies, softmax_scale=1.0, temperature=None,
                        normalize_proxies=None):
    x, labels = inp.embeddings, inp.labels
    check_proxies(proxies, x, labels, "ProxyNCALoss")
    scale = logit_scale(softmax_scale, temperature, normalize_proxies)
    proxies = proxies.to(x.dtype)  # PML casts its proxies to the embeddings' dtype
    d = inp.distance
    if normalize_proxies is None:
        mat = d(x, proxies)
    else:
        refs = F.normalize(proxies, p=2, dim=1) if normalize_proxies else proxies
        mat = distance_to_raw_refs(d, x, refs)
    logits = scale * (mat if d.is_inverted else -mat)
    w = miner_weights(inp.indices_tuple, len(x), x.dtype, x.device, anchors_only=True)
    own = F.one_hot(labels.long(), proxies.shape[0]).to(x.dtype)
    # PML sums the softmax over the own-class proxies (one here) and takes −log of that,
    # so an underflow to 0 is visible and the row is dropped instead of giving inf
    prob = (torch.softmax(logits, dim=1) * own).sum(1)
    keep = prob != 0
    losses = -torch.log(prob[keep]) * w[keep]
    return {"loss": {"losses": losses, "indices": torch.arange(len(x), device=x.device)[keep],
                     "reduction_type": "element"}}
