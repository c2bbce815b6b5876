"""HPHN triplet with Embedding Expansion: each anchor's closest (side point, negative point)
pair from the per-point mining (best value and column per point of the expansion), as one
Triton kernel, in place of fused/ee_hphn_picks._closest_side_pairs' scatter reductions and
the picks' encoding (about 60 small launches a call, each a fixed cost on a GPU).

Anchor i's side A_i is x_i, then the points of the segments with i as first endpoint, then as
second, each segment in order and k ascending (the reference's order). Its pair is the side
entry with the closest value (smallest distance, or largest similarity when inverted), then
the lowest negative column, then the earliest entry; none where no side entry has a
negative of another class. A program takes one anchor and walks its segment ends (a CSR over
the segments' two ends, by one stable sort) a block at a time, each block's n points as a
tile, merging the block's winner into its running one lexicographically. Output: per anchor
[a_u, a_w, a_k, q_u, q_w, q_k] (points as (u, w, k), originals (i, i, n+1); −1: none),
written into the picks' columns 1..6."""
from __future__ import annotations

import torch

from .launch import HAS_TRITON, next_pow2, triton_op

_OP = "metrix_ops::triton_ee_side_pairs"

if HAS_TRITON:
    import triton
    import triton.language as tl

    _BIG = tl.constexpr(2 ** 62)  # above any column or point index

    @triton.jit
    def _encode(out_ptr, t, seg_i_ptr, seg_j_ptr, B, n, has):
        """(u, w, k) of point t into out[0..2]: an original (t, t, n+1), or point k of
        segment e (t = B + e·n + k − 1); −1 where not has."""
        syn = t >= B
        rel = tl.where(syn, t - B, 0)
        nn = tl.maximum(n, 1)
        e = rel // nn
        u = tl.where(syn, tl.load(seg_i_ptr + e, mask=syn & has, other=0), t)
        w = tl.where(syn, tl.load(seg_j_ptr + e, mask=syn & has, other=0), t)
        k = tl.where(syn, rel % nn + 1, n + 1)
        tl.store(out_ptr, tl.where(has, u, -1))
        tl.store(out_ptr + 1, tl.where(has, w, -1))
        tl.store(out_ptr + 2, tl.where(has, k, -1))

    @triton.jit
    def _side_pairs_kernel(best_ptr, col_ptr, seg_i_ptr, seg_j_ptr, ends_ptr, off_ptr, out_ptr,
                           B, S, n, stride_out, INVERTED: tl.constexpr, BLOCK_S: tl.constexpr,
                           NP: tl.constexpr):
        i = tl.program_id(0)
        far = float("-inf") if INVERTED else float("inf")
        # the first side entry: x_i itself (point i)
        c0 = tl.load(col_ptr + i)
        sv = tl.where(c0 >= 0, tl.load(best_ptr + i).to(tl.float64), far)
        sq = tl.where(c0 >= 0, c0.to(tl.int64), _BIG)
        st = i.to(tl.int64)
        lo = tl.load(off_ptr + i)
        hi = tl.load(off_ptr + i + 1)
        kk = tl.arange(0, NP)
        for j0 in range(lo, hi, BLOCK_S):
            offs = j0 + tl.arange(0, BLOCK_S)
            in_s = offs < hi
            end = tl.load(ends_ptr + offs, mask=in_s, other=0)  # e, or S + e (second end)
            e = end % tl.maximum(S, 1)
            t = B + e[:, None] * n + kk[None, :]  # its segment's points, k ascending
            ok = in_s[:, None] & (kk[None, :] < n)
            c = tl.load(col_ptr + t, mask=ok, other=-1)
            ok = ok & (c >= 0)
            v = tl.where(ok, tl.load(best_ptr + t, mask=ok, other=0.0).to(tl.float64), far)
            if INVERTED:
                tv = tl.max(tl.max(v, 1), 0)
            else:
                tv = tl.min(tl.min(v, 1), 0)
            tie = ok & (v == tv)
            tq = tl.min(tl.min(tl.where(tie, c.to(tl.int64), _BIG), 1), 0)
            # entries are in A_i order along (offs, kk): the earliest tied one is the least
            # rank offs·NP + kk
            rank = offs.to(tl.int64)[:, None] * NP + kk[None, :]
            te = tl.min(tl.min(tl.where(tie & (c == tq), rank, _BIG), 1), 0)
            tt = tl.min(tl.min(tl.where(rank == te, t.to(tl.int64), _BIG), 1), 0)
            if INVERTED:
                better = (tv > sv) | ((tv == sv) & (tq < sq))
            else:
                better = (tv < sv) | ((tv == sv) & (tq < sq))
            sv = tl.where(better, tv, sv)
            sq = tl.where(better, tq, sq)
            st = tl.where(better, tt, st)
        has = sq < _BIG
        row = out_ptr + i.to(tl.int64) * stride_out
        _encode(row, st, seg_i_ptr, seg_j_ptr, B, n, has)
        _encode(row + 3, tl.where(has, sq, 0), seg_i_ptr, seg_j_ptr, B, n, has)


@triton_op(_OP)
def _side_pairs_op(best: torch.Tensor, col: torch.Tensor, seg_i: torch.Tensor,
                   seg_j: torch.Tensor, b: int, n: int, inverted: bool) -> torch.Tensor:
    out = torch.empty((b, 6), dtype=torch.long, device=best.device)
    if b == 0:
        return out
    s = seg_i.shape[0] if n > 0 else 0
    seg_i, seg_j = seg_i[:s].long().contiguous(), seg_j[:s].long().contiguous()
    # each anchor's segment ends, first ends before second ends, each in segment order (a
    # stable sort keeps the concatenation's order within an anchor), and where each anchor's
    # run starts (by binary search: bincount's output size would be a host read on CUDA)
    ends, order = torch.sort(torch.cat([seg_i, seg_j]), stable=True)
    off = torch.searchsorted(ends, torch.arange(b + 1, device=best.device))
    if s == 0:  # no segment: the kernel reads none, but its pointers must not be null
        seg_i = seg_j = order = torch.zeros(1, dtype=torch.long, device=best.device)
    _side_pairs_kernel[(b,)](best.contiguous(), col.contiguous(), seg_i, seg_j, order, off, out,
                             b, s, n, out.stride(0), INVERTED=bool(inverted), BLOCK_S=16,
                             NP=next_pow2(max(n, 1)))
    return out


@_side_pairs_op.register_fake
def _(best, col, seg_i, seg_j, b, n, inverted):
    return best.new_empty((b, 6), dtype=torch.long)


def ee_side_pairs_triton(best, col, seg_i, seg_j, b: int, n: int, inverted: bool):
    """(B, 6) int64 [a_u, a_w, a_k, q_u, q_w, q_k] per anchor (−1: none) from the per-point
    mining's (best, col) over the B originals and the n points of each segment (seg_i,
    seg_j): fused/ee_hphn_picks' closest side pairs, encoded."""
    return torch.ops.metrix_ops.triton_ee_side_pairs(best, col, seg_i, seg_j, int(b), int(n),
                                                     bool(inverted))
