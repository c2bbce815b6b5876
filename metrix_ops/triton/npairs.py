"""NPairsLoss on the Triton engine: as on the CPU (fused/npairs.py), the N-pairs loss of
PML's first positive pair per label is ProxyNCA's softmax of the K anchors against the K
positives as proxies (labels 0..K−1, logit s, scale 1), so the Triton ProxyNCA kernels
(triton/proxy_nca.py) stream the K×K matrix; the pairs and the reduction are the CPU glue's."""
from __future__ import annotations

import torch

from ..fused.npairs import first_pairs, pairs_loss
from ..fused.npairs import supports as cpu_supports
from ..ops.proxy_nca import COSINE
from .launch import usable_on
from .proxy_nca import proxy_nca_rows


def _rows(xa, xp, targets):
    # the kernels take fp32/fp64; half inputs are computed in fp32 (the design's rule)
    if xa.dtype in (torch.float16, torch.bfloat16):
        xa, xp = xa.float(), xp.float()
    return proxy_nca_rows(xa, xp, targets, 1.0, COSINE)


def supports(params, inp, expansion) -> bool:
    x = inp.embeddings
    return cpu_supports(params, inp, expansion, need_ext=False) and usable_on(x.device, x.dtype)


def impl(params, inp, reducer):
    return pairs_loss(inp, reducer, *first_pairs(inp.labels), rows_fn=_rows)


from ..fused import register  # noqa: E402

register("triton", "NPairsLoss", supports, impl)
