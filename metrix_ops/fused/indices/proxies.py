"""ProxyNCALoss and ProxyAnchorLoss with an indices_tuple. PML does not select terms there:
it weights examples by their count in the tuple over the largest count
(reference.proxy_anchor.miner_weights). ProxyNCA weights each example's loss (counting the
tuple's anchors only), so the clean fused op's per-example rows serve, weighted.
ProxyAnchor counts every position and adds w − 1 to each exponent of the example (inside its
per-proxy sums): its op's weighted form (proxy_anchor_weighted_*) takes those log-weights."""
from __future__ import annotations

import torch

from ... import _ext
from ...ops.proxy_anchor import proxy_anchor_terms
from ...ops.proxy_nca import proxy_nca_rows
from ...reference.proxy_anchor import miner_weights
from .. import proxy_anchor, proxy_nca, register_indices


def supports(params, inp, expansion) -> bool:
    return (inp.indices_tuple is not None
            and proxy_nca.supports(params, inp.with_indices(None), expansion))


def impl(params, inp, reducer):
    x = inp.embeddings
    w = miner_weights(inp.indices_tuple, len(x), x.dtype, x.device, anchors_only=True)

    def weighted_rows(*args):
        rows = proxy_nca_rows(*args)
        # rows_impl drops an example whose own-proxy probability e^{−row} underflows to 0, as
        # the reference does before weighting: such rows stay unweighted so that they still
        # underflow (a weight < 1 could bring them back, a weight 0 would make them 0)
        under = torch.exp(-rows.detach()) == 0
        return torch.where(under, rows, rows * w)

    return proxy_nca.rows_impl(weighted_rows, params, inp, reducer)


register_indices("cpu", "ProxyNCALoss", supports, impl)


def anchor_supports(params, inp, expansion) -> bool:
    # the weighted op: C++ on the CPU, and csrc/cuda/proxy_losses_cuda.cu in a CUDA build
    on_device = (inp.embeddings.device.type == "cpu"
                 or _ext.has_cuda_kernel("proxy_anchor_weighted_fwd"))
    return (inp.indices_tuple is not None and on_device
            and proxy_anchor.supports(params, inp.with_indices(None), expansion))


def anchor_impl(params, inp, reducer):
    x = inp.embeddings
    log_w = miner_weights(inp.indices_tuple, len(x), x.dtype, x.device) - 1
    return proxy_anchor.terms_impl(
        lambda *args: proxy_anchor_terms(*args, log_w=log_w.detach()), params, inp, reducer)


register_indices("cpu", "ProxyAnchorLoss", anchor_supports, anchor_impl)
