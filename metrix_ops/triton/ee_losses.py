"""MultiSimilarityLoss, LiftedStructureLoss, GeneralizedLiftedStructureLoss and NPairsLoss with
Embedding Expansion on the Triton engine: the CPU engine's glue (fused/ee_losses.py: the clean
positive terms in PyTorch, PML's loss dicts and reducers) with the negative side's per-anchor
log-sum-exp from the Triton op (ee_neg_lse.py) instead of the C++ one."""
from __future__ import annotations

import functools

from .. import fused
from ..fused import ee_losses as glue
from .ee_neg_lse import covers, ee_neg_lse_triton
from .pairs import max_dim


def supports(params, inp, expansion) -> bool:
    x = inp.embeddings
    return (glue.fits(inp, expansion) and x.shape[1] <= max_dim(x.dtype)
            and covers(x, inp.labels))


for _name, _fn in (("MultiSimilarityLoss", glue.multi_similarity),
                   ("LiftedStructureLoss", glue.lifted_structure),
                   ("GeneralizedLiftedStructureLoss", glue.generalized_lifted),
                   ("NPairsLoss", glue.npairs)):
    fused.register_expansion("triton", _name, supports,
                             functools.partial(_fn, lse_fn=ee_neg_lse_triton))
