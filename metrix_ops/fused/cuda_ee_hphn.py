"""backend="cuda": HPHNTripletLoss with Embedding Expansion. The per-point hard-negative
mining is csrc/cuda/ee_point_mine_cuda.cu (per point of the expansion its closest point of
another class; the points' Gram entries from per-chunk products, never a point stack), the
farthest positive the clean CUDA mining op's (hphn_mine_cuda.cu); the per-anchor picks and the
loss are the other engines' (fused/ee_hphn_picks.py, hphn_triplet.picks_loss)."""
from __future__ import annotations

import torch

from .. import _ext
from ..ops.ee_mining import ee_hphn_mine
from ..ops.unit_rows import normalized
from . import hphn_triplet, register_expansion
from .ee_hphn_picks import ee_hphn_picks

HAS_EE_MINE = _ext.has_cuda_kernel("ee_point_mine")
GPU_BLOCK = 1 << 23  # Gram entries per product (two per chunk of units)

if HAS_EE_MINE:
    @torch.library.register_fake("metrix_ops::ee_point_mine")
    def _fake(x, pu, pw, plam, pscale, plab, n_points, inverted, chunk):
        return x.new_empty(pu.shape[0]), pu.new_empty(pu.shape[0])


def ee_hphn_mine_cuda(x_unit, labels, seg_i, seg_j, n_points: int, inverted: bool,
                      chunk: int | None = None) -> torch.Tensor:
    """B × 7 int64 picks per anchor, as the CPU op ops.ee_mining.ee_hphn_mine; chunk: mining
    units (an original, or up to 8 points of a segment) per Gram product."""
    units = chunk or max(1, GPU_BLOCK // max(x_unit.shape[0], 1))

    def point_mine(x, pts, lam, scale):
        return torch.ops.metrix_ops.ee_point_mine(x, pts.u, pts.w, lam, scale, pts.labels,
                                                  int(n_points), bool(inverted), int(units))

    def farthest_positive(x, labels):
        empty = labels.new_empty(0)
        return ee_hphn_mine(x, labels, empty, empty, 0, hphn_triplet.CHUNK)[:, 0]
    return ee_hphn_picks(x_unit, labels, seg_i, seg_j, n_points, inverted, point_mine,
                         farthest_positive)


def supports(params, inp, expansion) -> bool:
    # (hphn_triplet.supports takes an EE call only on the batch against itself)
    return (HAS_EE_MINE and expansion is not None and inp.embeddings.device.type == "cuda"
            and hphn_triplet.supports(params, inp, expansion))


def impl(params, inp, reducer, expansion):
    labels, d = inp.labels.long(), inp.distance
    xu = normalized(d, inp.embeddings)
    seg_i, seg_j = hphn_triplet.segments_for(labels, expansion)
    # looked up per call (tests count the calls by patching it)
    idx = ee_hphn_mine_cuda(xu, labels, seg_i, seg_j, expansion.n_points, d.is_inverted)
    return hphn_triplet.picks_loss(params, inp, reducer, xu, idx, expansion.n_points)


register_expansion("cuda", "HPHNTripletLoss", supports, impl)
