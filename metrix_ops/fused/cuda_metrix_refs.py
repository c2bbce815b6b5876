"""The embedding-level Metrix term (pairs "pos_neg" or "anchor_neg") of anchors against
references (`ref_emb`, a cross-batch memory bank, an indices_tuple beside Metrix) on CUDA
tensors, from the CUDA engine's refs ops (csrc/cuda/ms_metrix_cuda.cu,
contrastive_metrix_cuda.cu, lse_metrix_cuda.cu on cuda/metrix_rows.cuh: per chunk of whole
classes one product of its anchors and its classes' reference positives against the
references, the candidates in closed form, no B×M matrix) for MultiSimilarity and Circle
(cosine), Contrastive and GeneralizedLifted (cosine or normalised L2). The mixed term alone,
beside the CUDA engine's clean loss (the other engines keep the PyTorch chunks until a GPU
run measures both), finished by fused/metrix_refs.py as the CPU ops' outputs are. Fake
kernels and autograd here; CUDA builds only."""
from __future__ import annotations

import torch

from .. import _ext
from ..distances import is_cosine
from ..ops.autograd import call
from ..ops.ms_metrix import refs_sorted
from .cuda_metrix import register_mix_op

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


def refs_rows(name: str, params: dict, inp, pairs: str, lam: float, xh, rh, self_idx):
    """The refs op of `name`'s per-anchor outputs (in label-sorted anchor order: the
    finishing sums over anchors) for unit anchors xh against unit references rh (fp32 or
    fp64 CUDA tensors; self_idx: each anchor's own row of rh, −1: none): MS's ℓ̃, Circle's
    and GeneralizedLifted's (lse⁺, lse⁻), Contrastive's (sums, counts)."""
    xs, rs, ys, rys, own, _ = refs_sorted(xh, rh, inp.labels, inp.ref_labels, self_idx)
    ops, args = torch.ops.metrix_ops, (xs, rs, ys, rys, own)
    tail = (float(lam), pairs == "anchor_neg", int(CHUNK))
    if name == "MultiSimilarityLoss":
        return call(ops.ms_metrix_mix_refs_fwd, *args, float(params["alpha"]),
                    float(params["beta"]), float(params["base"]), *tail)[0]
    if name == "CircleLoss":
        return call(ops.circle_metrix_mix_refs_fwd, *args, float(params["m"]),
                    float(params["gamma"]), *tail)
    margins = (is_cosine(inp.distance), float(params["pos_margin"]),
               float(params["neg_margin"]))
    op = (ops.contrastive_metrix_mix_refs_fwd if name == "ContrastiveLoss"
          else ops.lifted_metrix_mix_refs_fwd)
    return call(op, *args, *margins, *tail)
