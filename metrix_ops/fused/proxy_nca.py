"""ProxyNCALoss through the fused streaming op: per-example cross-entropy terms from
proxy_nca_fwd (no B×C matrix), then the reference's loss dict (PML's dropped-underflow
rule) and any reducer. Covers unit embeddings and proxies under PML's default
LpDistance(power=2) or CosineSimilarity, with the ProxyNCA++ temperature; raw proxies
(normalize_proxies=False) and other distances go to the reference."""
from __future__ import annotations

import torch

from .. import _ext
from ..distances import LpDistance, is_cosine
from ..ops.proxy_nca import COSINE, SQUARED_L2, proxy_nca_rows
from ..reducers import reduce_loss_dict
from ..reference.proxy_anchor import check_proxies
from ..reference.proxy_nca import logit_scale
from ..ops.unit_rows import unit_rows
from . import register


def _kind(d):
    if is_cosine(d):
        return COSINE
    if type(d) is LpDistance and d.normalize_embeddings and d.p == 2 and d.power == 2:
        return SQUARED_L2
    return None


def supports(params, inp, expansion) -> bool:
    return (_ext.HAS_EXT and expansion is None and inp.indices_tuple is None
            and inp.labels is not None and _kind(inp.distance) is not None
            and inp.ref_emb is inp.embeddings  # e.g. a memory bank: not proxies' references
            and params.get("normalize_proxies") is not False)


def rows_impl(rows_fn, params, inp, reducer):
    """The loss from a backend's per-example rows: rows_fn(x_unit, p_unit, labels, scale,
    kind) -> lse over the proxies' logits − the own proxy's logit."""
    x, labels, proxies = inp.embeddings, inp.labels, params["proxies"]
    check_proxies(proxies, x, labels, "ProxyNCALoss")
    scale = logit_scale(params["softmax_scale"], params.get("temperature"),
                        params.get("normalize_proxies"))
    p = unit_rows(proxies.to(x.dtype))  # differentiable cast, as the reference
    rows = rows_fn(unit_rows(x), p, labels, scale, _kind(inp.distance))
    # PML drops an example whose own-proxy probability underflows to 0: a mask for the
    # reducer rather than rows[keep] (no data-dependent shape: torch.compile traces it whole)
    keep = torch.exp(-rows.detach()) != 0
    loss_dict = {"loss": {"losses": rows, "indices": torch.arange(len(x), device=x.device),
                          "reduction_type": "element", "keep": keep}}
    return reduce_loss_dict(loss_dict, reducer, x)


def impl(params, inp, reducer, chunk=None):
    return rows_impl(lambda *args: proxy_nca_rows(*args, chunk), params, inp, reducer)


register("cpu", "ProxyNCALoss", supports, impl)
