"""MultiSimilarityLoss, LiftedStructureLoss, GeneralizedLiftedStructureLoss, NPairsLoss and
TripletMarginLoss with Embedding Expansion on the Triton engine: the CPU engine's glue
(fused/ee_losses.py: the clean positive terms in PyTorch, PML's loss dicts and reducers) with
the negative side from the Triton ops instead of the C++ ones: the per-anchor log-sum-exp
(ee_neg_lse.py), or the triplet totals (ee_triplet.py)."""
from __future__ import annotations

import functools

from .. import fused
from ..fused import ee_losses as glue
from .ee_neg_lse import covers, ee_neg_lse_triton
from .ee_triplet import ee_triplet_triton
from .pairs import max_dim


def supports(params, inp, expansion) -> bool:
    x = inp.embeddings
    return (glue.fits(inp, expansion) and x.shape[1] <= max_dim(x.dtype)
            and covers(x, inp.labels, expansion.pairs))


def triplet_supports(params, inp, expansion) -> bool:
    return glue.triplet_fits(params, inp, expansion) and supports(params, inp, expansion)


for _name, _fn in (("MultiSimilarityLoss", glue.multi_similarity),
                   ("LiftedStructureLoss", glue.lifted_structure),
                   ("GeneralizedLiftedStructureLoss", glue.generalized_lifted),
                   ("NPairsLoss", glue.npairs)):
    fused.register_expansion("triton", _name, supports,
                             functools.partial(_fn, lse_fn=ee_neg_lse_triton))
fused.register_expansion("triton", "TripletMarginLoss", triplet_supports,
                         functools.partial(glue.triplet_margin, trip_fn=ee_triplet_triton))
