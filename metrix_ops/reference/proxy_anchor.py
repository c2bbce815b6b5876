"""ProxyAnchorLoss (Kim et al. 2020), PML's semantics: proxies are the anchors;
pos: Σ_{proxies with positives} log(1 + Σ_{x of c} e^{−α(s−δ)}) / #proxies-with-positives,
neg: Σ_{all proxies} log(1 + Σ_{x not of c} e^{α(s+δ)}) / #proxies. Miner triplets/pairs
reweight examples (log-weight added to the exponent, as PML)."""
from __future__ import annotations

import torch

from ..distances import CosineSimilarity
from ..reducers import DivisorReducer
from ..spec import LossInputs, register_loss
from .lse import masked_logsumexp


def miner_weights(indices_tuple, n: int, dtype, device, anchors_only: bool = False):
    """PML's convert_to_weights: how often each example appears in the mined tuple, over
    the largest count; all ones when no tuple (or an empty one) is given."""
    w = torch.zeros(n, dtype=dtype, device=device)
    if indices_tuple is None or all(len(x) == 0 for x in indices_tuple):
        return w + 1
    if anchors_only:  # the query side only: a of triplets, a1 and a2 of pairs
        idx = indices_tuple[0] if len(indices_tuple) == 3 else \
            torch.cat([indices_tuple[0], indices_tuple[2]])
    else:
        idx = torch.cat(list(indices_tuple))
    uniq, counts = torch.unique(idx, return_counts=True)
    w[uniq] = counts.to(dtype) / counts.max()
    return w


def check_proxies(proxies, embeddings, labels):
    if not torch.is_tensor(proxies) or proxies.ndim != 2 or proxies.shape[1] != embeddings.shape[1]:
        raise ValueError(f"proxies must be (num_classes, {embeddings.shape[1]})")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= proxies.shape[0]):
        raise ValueError(f"labels must be in [0, num_classes={proxies.shape[0]}), got values in "
                         f"[{int(labels.min())}, {int(labels.max())}]")


@register_loss("ProxyAnchorLoss", CosineSimilarity, DivisorReducer, supports_ref_emb=False)
def proxy_anchor_loss_dict(inp: LossInputs, proxies, margin=0.1, alpha=32.0):
    x, labels = inp.embeddings, inp.labels
    check_proxies(proxies, x, labels)
    proxies = proxies.to(x.dtype)
    d = inp.distance
    s = d(x, proxies)  # B × C
    log_w = (miner_weights(inp.indices_tuple, len(x), x.dtype, x.device) - 1)[:, None]
    pos = torch.nn.functional.one_hot(labels, proxies.shape[0]).bool()
    pos_term = masked_logsumexp(alpha * d.margin(s, margin) + log_w, pos, add_one=True, dim=0)
    neg_term = masked_logsumexp(alpha * d.margin(-margin, s) + log_w, ~pos, add_one=True, dim=0)
    idx = torch.arange(proxies.shape[0], device=x.device)
    return {
        "pos_loss": {"losses": pos_term.squeeze(0), "indices": idx, "reduction_type": "element",
                     "divisor": int(pos.any(0).sum())},
        "neg_loss": {"losses": neg_term.squeeze(0), "indices": idx, "reduction_type": "element",
                     "divisor": proxies.shape[0]},
    }
