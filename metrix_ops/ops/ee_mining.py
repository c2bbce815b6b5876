"""HPHN triplet mining with Embedding Expansion (csrc/cpu/ee_mining_cpu.cpp): the op wrapper,
its fake kernel for torch.compile, and the O(S)-memory segment table it needs. The op has no
gradient: it only picks indices; the loss recomputes the chosen distances with gradient."""
from __future__ import annotations

import torch

from .. import _ext

_OP = "metrix_ops::ee_hphn_mine"

if _ext.HAS_EXT:
    @torch.library.register_fake(_OP)
    def _fake(x, labels, seg_i, seg_j, n_points, chunk):
        return labels.new_empty(x.shape[0], 7)


def all_segments(labels: torch.Tensor):
    """Every unordered positive pair i < j in row-major order, exactly as the reference's
    torch.where(same.triu(1)), but in O(#pairs) memory instead of a B×B mask."""
    b = len(labels)
    order = torch.argsort(labels, stable=True)  # each class in index order
    ys = labels[order]
    # one past each row's class run, by binary search: no host sync (torch.unique's output
    # size is the number of classes, read from the device)
    end = torch.searchsorted(ys, ys, right=True)
    slot = torch.arange(b, device=labels.device)
    partners = end - 1 - slot  # the later members of the same class
    first = slot.repeat_interleave(partners)
    k = torch.arange(len(first), device=labels.device)
    # output_size: the pair count, which torch.compile cannot infer from data, so that the
    # elementwise ops see one size and need no guard on it
    second = first + 1 + k - (torch.cumsum(partners, 0) - partners).repeat_interleave(
        partners, output_size=len(first))
    i, j = order[first], order[second]
    keep = torch.argsort(i * b + j)
    return i[keep], j[keep]


def ee_hphn_mine(x_unit: torch.Tensor, labels: torch.Tensor, seg_i: torch.Tensor,
                 seg_j: torch.Tensor, n_points: int, chunk: int = 256) -> torch.Tensor:
    """B × 7 int64 [p, a_u, a_w, a_k, q_u, q_w, q_k] per anchor (−1: none), points as
    (u, w, k) = k/(n+1)·x̂_u + (1 − k/(n+1))·x̂_w normalised; originals (i, i, n+1)."""
    return torch.ops.metrix_ops.ee_hphn_mine(
        x_unit.detach().contiguous(), labels.long().contiguous(), seg_i.long().contiguous(),
        seg_j.long().contiguous(), int(n_points), int(chunk))
