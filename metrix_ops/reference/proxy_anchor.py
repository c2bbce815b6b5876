"""ProxyAnchorLoss (Kim et al. 2020) with PML's semantics.

Proxies are the anchors. With s = sim(x, proxies) (B × C, cosine by default), δ the margin:

    pos = Σ_{c with a positive} log(1 + Σ_{x of class c}     e^{−α(s−δ)}) / #classes with a positive
    neg = Σ_{all c}             log(1 + Σ_{x not of class c} e^{ α(s+δ)}) / C

each computed as a masked log-sum-exp (α = 32 and s up to 1 would overflow a naive exp
in half precision; with an unnormalised similarity, in fp32 too). Default reducer:
DivisorReducer with those two divisors.

PML quirks reproduced:
- indices_tuple does not select terms: it reweights examples. Each example's weight is its
  number of appearances in the tuple (every position: anchors, positives and negatives)
  over the largest count, and w − 1 is *added to the exponent* after the α scaling, so an
  example the miner never picked still counts, with factor e^{−1}, not 0.
- any distance is accepted; with a distance (not a similarity) `margin` flips signs, so
  the terms become e^{α(d−δ)} and e^{α(−δ−d)}, as PML computes them.
- ref_emb is not supported.
"""
from __future__ import annotations

import torch

from ..distances import CosineSimilarity
from ..reducers import DivisorReducer
from ..spec import LossInputs, register_loss
from .lse import masked_logsumexp


def miner_weights(indices_tuple, n: int, dtype, device, anchors_only: bool = False):
    """PML's convert_to_weights: how often each of the n batch examples appears in the
    mined tuple, over the largest count (0 for examples never picked); all ones when no
    tuple (or only empty index tensors) is given. `anchors_only` counts the query side
    only (a of triplets, a1 and a2 of pairs), as PML does when the references are not the
    batch (ProxyNCA's proxies)."""
    w = torch.zeros(n, dtype=dtype, device=device)
    if indices_tuple is None or all(len(x) == 0 for x in indices_tuple):
        return w + 1
    if anchors_only:
        idx = indices_tuple[0] if len(indices_tuple) == 3 else \
            torch.cat([indices_tuple[0], indices_tuple[2]])
    else:
        idx = torch.cat(list(indices_tuple))
    # counts by index_add, not torch.unique: the same values with a static shape, so that a
    # loss under torch.compile(fullgraph=True) traces through
    counts = w.index_add(0, idx, torch.ones_like(idx, dtype=dtype))
    return counts / counts.max()


def check_proxies(proxies, embeddings, labels, loss_name: str = "this loss"):
    if labels is None:
        raise ValueError(f"{loss_name} needs labels (an indices_tuple alone is not enough)")
    if proxies is None:
        raise ValueError(f"proxies must be passed to the functional {loss_name}: proxies=, a "
                         f"(num_classes, {embeddings.shape[1]}) tensor (the module owns its own)")
    if not torch.is_tensor(proxies) or proxies.ndim != 2 or proxies.shape[1] != embeddings.shape[1]:
        got = tuple(proxies.shape) if torch.is_tensor(proxies) else type(proxies).__name__
        raise ValueError(f"proxies must be (num_classes, {embeddings.shape[1]}), the embeddings' "
                         f"dim, got {got} (a proxy loss's embedding_size must match the "
                         "embeddings)")
    if not proxies.is_floating_point():
        raise TypeError(f"proxies must be a floating-point tensor, got {proxies.dtype}")
    if proxies.device != embeddings.device:
        raise ValueError(f"proxies are on {proxies.device} but embeddings are on {embeddings.device}")
    # the labels' range [0, num_classes) is checked with the call's other data checks, in
    # one host read (driver: check_loss_inputs's num_classes)


@register_loss("ProxyAnchorLoss", CosineSimilarity, DivisorReducer, supports_ref_emb=False,
               sub_losses=("pos_loss", "neg_loss"))
def proxy_anchor_loss_dict(inp: LossInputs, proxies, margin=0.1, alpha=32.0):
    x, labels = inp.embeddings, inp.labels
    check_proxies(proxies, x, labels, "ProxyAnchorLoss")
    # PML casts its proxies to the embeddings' dtype; a differentiable cast keeps the
    # parameter's own dtype and still sends it the gradient
    proxies = proxies.to(x.dtype)
    d = inp.distance
    s = d(x, proxies)  # B × C
    log_w = (miner_weights(inp.indices_tuple, len(x), x.dtype, x.device) - 1)[:, None]
    pos = torch.nn.functional.one_hot(labels.long(), proxies.shape[0]).bool()
    # reductions over dim 0: one term per proxy, the sum running over the batch
    pos_term = masked_logsumexp(alpha * d.margin(s, margin) + log_w, pos, add_one=True, dim=0)
    neg_term = masked_logsumexp(alpha * d.margin(-margin, s) + log_w, ~pos, add_one=True, dim=0)
    idx = torch.arange(proxies.shape[0], device=x.device)
    return {
        "pos_loss": {"losses": pos_term.squeeze(0), "indices": idx, "reduction_type": "element",
                     "divisor": int(pos.any(0).sum())},
        "neg_loss": {"losses": neg_term.squeeze(0), "indices": idx, "reduction_type": "element",
                     "divisor": proxies.shape[0]},
    }
