"""The embedding-level Metrix term (pairs "pos_neg" or "anchor_neg") of anchors against
references (`ref_emb`, a cross-batch memory bank, an indices_tuple beside Metrix) on CUDA
tensors, from the CUDA engine's refs ops (csrc/cuda/ms_metrix_cuda.cu,
contrastive_metrix_cuda.cu, lse_metrix_cuda.cu on cuda/metrix_rows.cuh: per chunk of whole
classes one product of its anchors and its classes' reference positives against the
references, the candidates in closed form, no B×M matrix) for MultiSimilarity and Circle
(cosine), Contrastive and GeneralizedLifted (cosine or normalised L2). The mixed term alone,
beside the CUDA engine's clean loss (the other engines keep the PyTorch chunks until a GPU
run measures both), finished as fused/metrix_refs.py finishes the CPU ops' outputs. Fake
kernels and autograd here; CUDA builds only."""
from __future__ import annotations

import torch

from .. import _ext
from ..distances import is_cosine, is_normalized_l2
from ..ops.circle_metrix import finish_circle_mixed
from ..ops.lifted_metrix import finish_lifted_lses
from ..ops.ms_metrix import refs_sorted
from ..reducers import zero_loss
from ..reference.metrix_soft_forms import combine_parts
from . import contrastive as con
from .cuda_metrix import register_mix_op
from .metrix_refs import with_negatives

OPS = ("ms_metrix_mix_refs", "contrastive_metrix_mix_refs", "circle_metrix_mix_refs",
       "lifted_metrix_mix_refs")
HAS_OPS = all(_ext.has_cuda_kernel(f"{op}_fwd") for op in OPS)
# rows of Q (a chunk's anchors and their classes' positives) per product Q Rᵀ: one such
# product, its ∂L/∂S and its 1/‖v‖ recomputations are the op's memory (tests set it small)
CHUNK = 1024

# the outputs as the in-batch ops' (cuda_metrix.py), with (dx, dr) from the backward
if HAS_OPS:
    register_mix_op("ms_metrix_mix_refs", 3, grad_outputs=(0,), saved_outputs=(1, 2),
                    refs=True)
    register_mix_op("contrastive_metrix_mix_refs", 4, grad_outputs=(0, 2), saved_outputs=(),
                    long_outputs=(1, 3), refs=True)
    for _name in ("circle_metrix_mix_refs", "lifted_metrix_mix_refs"):
        register_mix_op(_name, 2, grad_outputs=(0, 1), saved_outputs=(0, 1), refs=True)


def covers(name: str, distance) -> bool:
    """Whether a refs op takes `name`'s mixed term under `distance`."""
    cosine, l2 = is_cosine(distance), is_normalized_l2(distance)
    return HAS_OPS and (cosine if name in ("MultiSimilarityLoss", "CircleLoss") else
                        (cosine or l2) and name in ("ContrastiveLoss",
                                                    "GeneralizedLiftedStructureLoss"))


def mixed_term(name: str, params: dict, inp, pairs: str, lam: float, xh, rh, self_idx):
    """L̃ (unweighted) of the unit anchors xh against the unit references rh (fp32 or fp64
    CUDA tensors; self_idx: each anchor's own row of rh, −1: none) for a call covers()
    accepts: the sums over anchors need no unsorting."""
    xs, rs, ys, rys, own, _ = refs_sorted(xh, rh, inp.labels, inp.ref_labels, self_idx)
    ops = torch.ops.metrix_ops
    cosine = is_cosine(inp.distance)
    tail = (float(lam), pairs == "anchor_neg", int(CHUNK))
    if name == "MultiSimilarityLoss":
        mix, _, _ = ops.ms_metrix_mix_refs_fwd(xs, rs, ys, rys, own, float(params["alpha"]),
                                               float(params["beta"]), float(params["base"]),
                                               *tail)
        return combine_parts([(mix.sum(), with_negatives(inp.labels, inp.ref_labels))], xh)
    if name == "CircleLoss":
        if not 0.0 < lam < 1.0:  # one side has no label mass: every ℓ̃(a) is 0
            return zero_loss(xh)
        lp, ln = ops.circle_metrix_mix_refs_fwd(xs, rs, ys, rys, own, float(params["m"]),
                                                float(params["gamma"]), *tail)
        return finish_circle_mixed(torch.isfinite(lp), lp + ln, lam, xh)
    margins = (cosine, float(params["pos_margin"]), float(params["neg_margin"]))
    if name == "ContrastiveLoss":
        mixed = ops.contrastive_metrix_mix_refs_fwd(xs, rs, ys, rys, own, *margins, *tail)
        return con.mixed_contrastive(mixed, xh)
    lp, ln = ops.lifted_metrix_mix_refs_fwd(xs, rs, ys, rys, own, *margins, *tail)
    return finish_lifted_lses(lp, ln, lam, xh)
