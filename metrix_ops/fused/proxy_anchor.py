"""ProxyAnchorLoss through the fused streaming op: the per-proxy positive and negative
terms come from proxy_anchor_fwd, or with a gradient wanted from proxy_anchor_grad_fwd,
which forms the gradient's parts in the same pass (ops/proxy_anchor.py; no B×C matrix). They are the reference's per-proxy
terms, so the loss dict and every reducer (PML's DivisorReducer by default) apply as is."""
from __future__ import annotations

import torch

from .. import _ext
from ..distances import is_cosine
from ..ops.proxy_anchor import proxy_anchor_terms
from ..reducers import reduce_loss_dict
from ..reference.proxy_anchor import check_proxies
from ..ops.unit_rows import unit_rows
from . import register
from .pair_counts import class_counts


def supports(params, inp, expansion) -> bool:
    return (_ext.HAS_EXT and expansion is None and inp.indices_tuple is None
            and is_cosine(inp.distance) and inp.labels is not None
            and inp.ref_emb is inp.embeddings)  # e.g. a memory bank: not proxies' references


def terms_impl(terms_fn, params, inp, reducer):
    """The loss from a backend's per-proxy terms: terms_fn(x_unit, p_unit, labels, alpha,
    margin) -> (positive, negative) log-sum-exp term of each proxy."""
    x, labels, proxies = inp.embeddings, inp.labels, params["proxies"]
    check_proxies(proxies, x, labels, "ProxyAnchorLoss")
    # as the reference: a differentiable cast, so the parameter keeps its dtype
    p = unit_rows(proxies.to(x.dtype))
    pos, neg = terms_fn(unit_rows(x), p, labels, params["alpha"], params["margin"])
    # a tensor, not int(): no host sync on a GPU, no graph break under torch.compile
    n_with_pos = class_counts(labels, p.shape[0]).count_nonzero()
    idx = torch.arange(p.shape[0], device=x.device)
    loss_dict = {
        "pos_loss": {"losses": pos, "indices": idx, "reduction_type": "element",
                     "divisor": n_with_pos},
        "neg_loss": {"losses": neg, "indices": idx, "reduction_type": "element",
                     "divisor": p.shape[0]},
    }
    return reduce_loss_dict(loss_dict, reducer, x)


def impl(params, inp, reducer, chunk=None):
    return terms_impl(lambda *args: proxy_anchor_terms(*args, chunk), params, inp, reducer)


register("cpu", "ProxyAnchorLoss", supports, impl)
