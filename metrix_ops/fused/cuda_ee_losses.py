"""backend="cuda": MultiSimilarityLoss, LiftedStructureLoss, GeneralizedLiftedStructureLoss,
NPairsLoss and TripletMarginLoss ("all") with Embedding Expansion. The CPU glue
(fused/ee_losses.py) as is, its ops (ee_neg_lse, ee_triplet) dispatched by device to their CUDA
implementations (csrc/cuda/ee_losses_cuda.cu, the CPU ops' schemas), with chunks of GPU_CHUNK
rows: a chunk pair's product and its point tiles (4·GPU_CHUNK points) are the kernels' units
of work, large enough to fill a GPU and small enough to stay O(B·D) in memory. No class-size
limit (the Triton engine's is 64 rows)."""
from __future__ import annotations

from .. import _ext
from ..ops.ee_losses import ee_neg_lse, ee_triplet
from . import ee_losses as glue
from . import register_expansion

HAS_EE = _ext.has_cuda_kernel("ee_neg_lse_fwd") and _ext.has_cuda_kernel("ee_triplet_fwd")
GPU_CHUNK = 512  # rows per class chunk (whole classes); tests set it small


def neg_lse_cuda(x_unit, labels, seg_i, seg_j, n_points, l2, scale, offset, anchor_mask=None,
                 neg_mask=None):
    """ops.ee_losses.ee_neg_lse with the GPU's chunk (the glue's lse_fn)."""
    return ee_neg_lse(x_unit, labels, seg_i, seg_j, n_points, l2, scale, offset, anchor_mask,
                      neg_mask, GPU_CHUNK)


def triplet_cuda(x_unit, labels, seg_i, seg_j, pos, n_points, l2, margin, smooth):
    """ops.ee_losses.ee_triplet with the GPU's chunk (the glue's trip_fn)."""
    return ee_triplet(x_unit, labels, seg_i, seg_j, pos, n_points, l2, margin, smooth,
                      GPU_CHUNK)


def supports(params, inp, expansion) -> bool:
    return HAS_EE and inp.embeddings.device.type == "cuda" and glue.fits(inp, expansion)


def triplet_supports(params, inp, expansion) -> bool:
    return supports(params, inp, expansion) and glue.triplet_fits(params, inp, expansion)


def _with_lse(fn):
    def impl(params, inp, reducer, expansion):
        return fn(params, inp, reducer, expansion, lse_fn=neg_lse_cuda)
    return impl


def _triplet(params, inp, reducer, expansion):
    return glue.triplet_margin(params, inp, reducer, expansion, trip_fn=triplet_cuda)


for _name, _fn in (("MultiSimilarityLoss", glue.multi_similarity),
                   ("LiftedStructureLoss", glue.lifted_structure),
                   ("GeneralizedLiftedStructureLoss", glue.generalized_lifted),
                   ("NPairsLoss", glue.npairs)):
    register_expansion("cuda", _name, supports, _with_lse(_fn))
register_expansion("cuda", "TripletMarginLoss", triplet_supports, _triplet)
