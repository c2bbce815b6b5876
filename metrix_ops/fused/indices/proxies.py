"""ProxyNCALoss with an indices_tuple. PML does not select terms there: each example's loss
is weighted by its count among the tuple's anchors over the largest count
(reference.proxy_anchor.miner_weights, anchors_only), so the clean fused op's per-example
rows serve, weighted. ProxyAnchorLoss's weights enter inside its exponentials (per example,
per proxy sum), which its op does not take: it stays on the reference."""
from __future__ import annotations

import dataclasses

import torch

from ...ops.proxy_nca import proxy_nca_rows
from ...reference.proxy_anchor import miner_weights
from .. import proxy_nca, register_indices


def supports(params, inp, expansion) -> bool:
    return (inp.indices_tuple is not None
            and proxy_nca.supports(params, dataclasses.replace(inp, indices_tuple=None), expansion))


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
