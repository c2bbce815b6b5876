"""TripletMarginLoss, triplets_per_anchor="all", on the Triton engine (backend="triton"):
per anchor i the sum over every (p, n) of PML's term [(k_ip − k_in) + m]₊, with the number
of terms > 0 and of triplets, without enumerating triplets and without a B×M matrix.

Keys (csrc/common/triplet.h): larger is farther. Cosine: k = −s (so (k_p − k_n) + m is
bit-for-bit PML's (s_an − s_ap) + m); L2: k = d = √(‖x‖² + ‖r‖² − 2s) from the rows' squared
norms (as cdist's matmul mode; exact for fp16/bf16 rows that are unit only to their
precision), 0 below a few ulps of the accumulation type, so duplicates are at distance 0 and
get no gradient, as cdist's. The gradient flows through s only: the norms' part is radial,
removed by the normalisation's backward.

Formulation. The CPU op sorts each row's positive keys and binary-searches every negative
(O(M log P) per row). A GPU row program cannot sort a dynamic list, but it can hold the
row's positive keys in a small per-anchor buffer and compare every negative against all of
them: O(M·P) comparisons per row, P the anchor's positives (a handful with class-balanced
batches; this is the "O(#positives) per anchor" side buffer, B × P_max, never B×M×M).

- kernel A (_tri_pos_keys_kernel): streams column tiles of S by tl.dot and scatters each
  positive's key to kp[i, rank], rank = its position among row i's positives in column order.
  The rank comes from a per-column rank within its class (computed on the host from the
  labels, O(M log M)), less one past the anchor's own column when that is excluded; no
  scan inside the kernel.
- kernel B (_tri_fwd_kernel): streams column tiles again; for each negative and each
  positive t of the row's buffer, v = (kp_t − k_n) + m; sums v over v > 0 and counts them.
- kernel C (_tri_pos_counts_kernel, the backward): per positive t, how many negatives are
  active with it, for a block of rows × BLOCK_P positives (grid axis 1) held in registers
  over the column tiles and stored once (no read-modify-write of global memory, which
  would need a barrier between a program's threads on a GPU).
- gradient (_tri_grad_dx_kernel: dX = G R by row programs; _tri_grad_dr_kernel: dR = Gᵀ X by
  column programs; no atomics): G_ij = g_i · dk/ds · (#active negatives of positive j) on a
  positive, −g_i · dk/ds · (#active positives with negative j) on a negative. The positive
  weights are a B × P_max table made on the host from kernel C's counts and read by rank;
  the negative counts are recomputed in the tile (the same O(P) loop as the forward).

The custom ops return per-anchor (loss sum, #terms > 0, #triplets); the reducers need
nothing else (AvgNonZero, Mean, Sum, as fused/triplet_margin.py on the CPU). Only B-sized
vectors are saved: the backward op rebuilds its side buffers (kernels A and C) itself, so
the op's outputs have static shapes and trace under torch.compile (A and C, then
the two gradient kernels: 4 S products in the backward, 2 in the forward)."""
import functools

import torch

from ..ops.autograd import call, register_autograd
import triton
import triton.language as tl

from .. import fused
from . import table_cache
from ..fused.triplet_margin import op_kind, totals_impl
from .launch import next_pow2, triton_op, usable_on
from .pairs import fake_grads, grads_or_empty, launch_config, loss_constants, max_dim
from .tiles import (add_tile_product, count_true, minus_radial, pair_masks, raw_zero_eps,
                    sim_tile, sq_norms)


@triton.jit
def _tri_sq_dist(s, nrm_ptr, offs_m, offs_n, B, M, eps, RAW: tl.constexpr):
    """(d², whether d² is above the zero threshold) of a similarity tile, d² = ‖x_i‖² +
    ‖r_j‖² − 2s from the rows' squared norms: threshold eps, or (RAW) eps · max(‖x_i‖²,
    ‖r_j‖²). See _tri_key."""
    nx = tl.load(nrm_ptr + offs_m, mask=offs_m < B, other=1.0)
    nr = tl.load(nrm_ptr + B + offs_n, mask=offs_n < M, other=1.0)
    q = (nx[:, None] + nr[None, :]) - 2.0 * s
    if RAW:
        thr = eps * tl.maximum(nx[:, None], nr[None, :])
    else:
        thr = eps
    return q, q > thr


@triton.jit
def _tri_key(s, nrm_ptr, offs_m, offs_n, B, M, eps, COSINE: tl.constexpr,
             RAW: tl.constexpr = False):
    """The key of a similarity tile: −s (cosine) or the L2 distance of the rows,
    d² = ‖x_i‖² + ‖r_j‖² − 2s with the rows' squared norms (nrm: B of x, then M of r, in the
    accumulation type), 0 below eps. The norms, not 1, make d exact for rows that are unit
    only to their dtype's precision (fp16/bf16: ‖x‖² = 1 ± 1e-2), so equal rows get d = 0
    under a threshold of a few fp32 ulps instead of one that would zero real distances.
    RAW (rows of any norm): the rounding of d² scales with the norms, and so does the
    threshold, eps · max(‖x_i‖², ‖r_j‖²) (eps: _constants). COSINE and RAW: the squared L2
    of raw rows, as −s̃ with s̃ = 1 − d²/2 under the same threshold (the squared form's
    glue halves the margin and doubles the terms, fused/triplet_margin.totals_impl), whose
    gradient in the rows is the L2 form's, radial part included (minus_radial)."""
    if COSINE and RAW:
        q, keep = _tri_sq_dist(s, nrm_ptr, offs_m, offs_n, B, M, eps, True)
        k = tl.where(keep, 0.5 * q - 1.0, -1.0)
    elif COSINE:
        k = -s
    else:
        q, keep = _tri_sq_dist(s, nrm_ptr, offs_m, offs_n, B, M, eps, RAW)
        k = tl.where(keep, tl.sqrt(tl.maximum(q, 0.0)), 0.0)
    return k


@triton.jit
def _tri_key_grad(k, COSINE: tl.constexpr):
    """dk/ds: −1 (cosine); −1/d (L2), 0 at d = 0 as torch's distance backward."""
    if COSINE:
        g = tl.zeros_like(k) - 1.0
    else:
        g = tl.where(k > 0.0, -1.0 / tl.where(k > 0.0, k, 1.0), 0.0)
    return g


@triton.jit
def _tri_pos_rank(offs_n, crank_ptr, srank, M):
    """Rank of column j among row i's positives (column order): its rank in its class, less
    one when the row's own (excluded) column comes before it in that class."""
    cr = tl.load(crank_ptr + offs_n, mask=offs_n < M, other=0)
    return cr[None, :] - (srank[:, None] < cr[None, :]).to(cr.dtype)


@triton.jit
def _tri_mined(kp, kn, m2, MINE: tl.constexpr):
    """Whether TripletMarginMiner keeps the triplets of positive keys kp and negative keys kn
    (common/triplet.h): by the gap g = k_n − k_p (PML's d_an − d_ap, or s_ap − s_an: the
    same bits) against its margin m2. MINE: 1 all (g ≤ m2), 2 hard (also g ≤ 0), 3 semihard
    (0 < g ≤ m2), 4 easy (g > m2)."""
    g = kn - kp
    if MINE == 4:
        keep = g > m2
    else:
        keep = g <= m2
        if MINE == 2:
            keep = keep & (g <= 0.0)
        if MINE == 3:
            keep = keep & (g > 0.0)
    return keep


@triton.jit
def _tri_neg_terms(kn, neg, kp_ptr, offs_m, row_ok, npos, margin, m2, PMAX, PS,
                   MINE: tl.constexpr):
    """Over the row's positive keys kp[i, 0..npos_i): per entry of the tile, Σ_t of the active
    terms v = (kp_t − k_n) + m > 0 on negatives, how many are active, and how many triplets
    there are (with MINE, only those the miner keeps: _tri_mined)."""
    vsum = tl.zeros(kn.shape, kn.dtype)
    cnt = tl.zeros(kn.shape, tl.int32)
    kept = tl.zeros(kn.shape, tl.int32)
    for t in range(0, PMAX):
        ok_t = row_ok & (t < npos)
        kp = tl.load(kp_ptr + offs_m * PS + t, mask=ok_t, other=float("-inf"))
        v = (kp[:, None] - kn) + margin
        keep = neg & ok_t[:, None]
        if MINE != 0:
            keep = keep & _tri_mined(kp[:, None], kn, m2, MINE)
        act = keep & (v > 0.0)
        vsum += tl.where(act, v, 0.0)
        cnt += act.to(tl.int32)
        kept += keep.to(tl.int32)
    return vsum, cnt, kept


@triton.jit
def _tri_pos_keys_kernel(x_ptr, r_ptr, lab_ptr, rlab_ptr, crank_ptr, srank_ptr, npos_ptr,
                         prm_ptr, nrm_ptr, kp_ptr, B, M, D, stride_x, stride_r, PS,
                         COSINE: tl.constexpr,
                         EXCLUDE_DIAG: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
                         PRECISION: tl.constexpr, RAW: tl.constexpr = False):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < B
    lab_m = tl.load(lab_ptr + offs_m, mask=row_ok, other=0)
    srank = tl.load(srank_ptr + offs_m, mask=row_ok, other=0)
    npos = tl.load(npos_ptr + offs_m, mask=row_ok, other=0)
    eps = tl.load(prm_ptr + 1)
    for n0 in range(0, M, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        lab_n = tl.load(rlab_ptr + offs_n, mask=offs_n < M, other=0)
        s = sim_tile(x_ptr, r_ptr, offs_m, offs_n, B, M, D, stride_x, stride_r,
                     BLOCK_M, BLOCK_N, BLOCK_D, ACC, PRECISION)
        pos, _ = pair_masks(offs_m, offs_n, lab_m, lab_n, B, M, EXCLUDE_DIAG)
        rank = _tri_pos_rank(offs_n, crank_ptr, srank, M)
        # rows without a negative have no slots (npos 0): nothing to store
        tl.store(kp_ptr + offs_m[:, None] * PS + rank,
                 _tri_key(s, nrm_ptr, offs_m, offs_n, B, M, eps, COSINE, RAW),
                 mask=pos & (rank < npos[:, None]))


@triton.jit
def _tri_fwd_kernel(x_ptr, r_ptr, lab_ptr, rlab_ptr, npos_ptr, prm_ptr, nrm_ptr, kp_ptr,
                    rows_ptr, nz_ptr, trip_ptr, B, M, D, stride_x, stride_r, PMAX, PS,
                    COSINE: tl.constexpr, EXCLUDE_DIAG: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    ACC: tl.constexpr, PRECISION: tl.constexpr, MINE: tl.constexpr = 0,
                    RAW: tl.constexpr = False):
    """Per row: the sum of its active terms, how many, and (with MINE) how many triplets the
    miner keeps (without MINE the host counts them: #positives × #negatives)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < B
    lab_m = tl.load(lab_ptr + offs_m, mask=row_ok, other=0)
    npos = tl.load(npos_ptr + offs_m, mask=row_ok, other=0)
    margin, eps, m2 = tl.load(prm_ptr), tl.load(prm_ptr + 1), tl.load(prm_ptr + 2)
    total = tl.zeros((BLOCK_M,), dtype=ACC)
    nz = tl.zeros((BLOCK_M,), dtype=tl.int64)
    trip = tl.zeros((BLOCK_M,), dtype=tl.int64)
    for n0 in range(0, M, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        lab_n = tl.load(rlab_ptr + offs_n, mask=offs_n < M, other=0)
        s = sim_tile(x_ptr, r_ptr, offs_m, offs_n, B, M, D, stride_x, stride_r,
                     BLOCK_M, BLOCK_N, BLOCK_D, ACC, PRECISION)
        _, neg = pair_masks(offs_m, offs_n, lab_m, lab_n, B, M, EXCLUDE_DIAG)
        kn = _tri_key(s, nrm_ptr, offs_m, offs_n, B, M, eps, COSINE, RAW)
        vsum, cnt, kept = _tri_neg_terms(kn, neg, kp_ptr, offs_m, row_ok, npos, margin, m2,
                                         PMAX, PS, MINE)
        total += tl.sum(vsum, axis=1)
        nz += tl.sum(cnt, axis=1).to(tl.int64)
        trip += tl.sum(kept, axis=1).to(tl.int64)
    tl.store(rows_ptr + offs_m, total, mask=row_ok)
    tl.store(nz_ptr + offs_m, nz, mask=row_ok)
    if MINE != 0:
        tl.store(trip_ptr + offs_m, trip, mask=row_ok)


@triton.jit
def _tri_pos_counts_kernel(x_ptr, r_ptr, lab_ptr, rlab_ptr, npos_ptr, prm_ptr, nrm_ptr,
                           kp_ptr, cnt_ptr, B, M, D, stride_x, stride_r, PS, COSINE: tl.constexpr,
                           EXCLUDE_DIAG: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
                           ACC: tl.constexpr, PRECISION: tl.constexpr, MINE: tl.constexpr = 0,
                           RAW: tl.constexpr = False):
    """cnt[i, t] = #negatives active with positive t (with MINE, of the triplets the miner
    keeps), for BLOCK_M rows and the BLOCK_P
    positives p0.. (grid axis 1) of each, held in registers over the column tiles (each
    program writes its block once: no read-modify-write of global memory)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    p0 = tl.program_id(1) * BLOCK_P
    row_ok = offs_m < B
    lab_m = tl.load(lab_ptr + offs_m, mask=row_ok, other=0)
    npos = tl.load(npos_ptr + offs_m, mask=row_ok, other=0)
    margin, eps, m2 = tl.load(prm_ptr), tl.load(prm_ptr + 1), tl.load(prm_ptr + 2)
    offs_p = tl.arange(0, BLOCK_P)
    counts = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.int32)
    for n0 in range(0, M, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        lab_n = tl.load(rlab_ptr + offs_n, mask=offs_n < M, other=0)
        s = sim_tile(x_ptr, r_ptr, offs_m, offs_n, B, M, D, stride_x, stride_r,
                     BLOCK_M, BLOCK_N, BLOCK_D, ACC, PRECISION)
        _, neg = pair_masks(offs_m, offs_n, lab_m, lab_n, B, M, EXCLUDE_DIAG)
        kn = _tri_key(s, nrm_ptr, offs_m, offs_n, B, M, eps, COSINE, RAW)
        for tt in range(0, BLOCK_P):
            t = p0 + tt
            kp = tl.load(kp_ptr + offs_m * PS + t, mask=row_ok & (t < npos),
                         other=float("-inf"))
            act = neg & (((kp[:, None] - kn) + margin) > 0.0)
            if MINE != 0:
                act = act & _tri_mined(kp[:, None], kn, m2, MINE)
            c = count_true(act, 1)
            counts += tl.where(offs_p[None, :] == tt, c[:, None], 0)
    t_ok = row_ok[:, None] & ((p0 + offs_p)[None, :] < npos[:, None])
    tl.store(cnt_ptr + offs_m[:, None] * PS + p0 + offs_p[None, :], counts, mask=t_ok)


@triton.jit
def _tri_grad_tile(s, offs_m, offs_n, row_ok, lab_m, lab_n, g, npos, srank, kp_ptr, w_ptr,
                   crank_ptr, prm_ptr, nrm_ptr, B, M, PMAX, PS, COSINE: tl.constexpr,
                   EXCLUDE_DIAG: tl.constexpr, MINE: tl.constexpr, RAW: tl.constexpr):
    """G = ∂(Σ_i g_i row_i)/∂S of a tile: positives read their weight from w[i, rank]
    (g_i · #active negatives · dk/ds), negatives count their active positives here."""
    margin, eps, m2 = tl.load(prm_ptr), tl.load(prm_ptr + 1), tl.load(prm_ptr + 2)
    pos, neg = pair_masks(offs_m, offs_n, lab_m, lab_n, B, M, EXCLUDE_DIAG)
    k = _tri_key(s, nrm_ptr, offs_m, offs_n, B, M, eps, COSINE, RAW)
    _, cnt, _ = _tri_neg_terms(k, neg, kp_ptr, offs_m, row_ok, npos, margin, m2, PMAX, PS,
                               MINE)
    gneg = -g[:, None] * cnt.to(s.dtype) * _tri_key_grad(k, COSINE)
    rank = _tri_pos_rank(offs_n, crank_ptr, srank, M)
    gpos = tl.load(w_ptr + offs_m[:, None] * PS + rank, mask=pos & (rank < npos[:, None]),
                   other=0.0)
    return tl.where(pos, gpos, tl.where(neg, gneg, 0.0))


@triton.jit
def _tri_grad_dx_kernel(x_ptr, r_ptr, lab_ptr, rlab_ptr, crank_ptr, srank_ptr, npos_ptr,
                        g_ptr, prm_ptr, nrm_ptr, kp_ptr, w_ptr, dx_ptr, B, M, D, stride_x,
                        stride_r, stride_dx, PMAX, PS, COSINE: tl.constexpr,
                        EXCLUDE_DIAG: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_DO: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                        MINE: tl.constexpr = 0, RAW: tl.constexpr = False):
    """dX = G R: one program per BLOCK_M anchor rows, streaming the reference tiles. RAW:
    plus d²'s radial part through ‖x_i‖², −(Σ_j G_ij) x_i (unit rows lose it in the
    normalisation's backward; rows of any norm keep it)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < B
    lab_m = tl.load(lab_ptr + offs_m, mask=row_ok, other=0)
    srank = tl.load(srank_ptr + offs_m, mask=row_ok, other=0)
    npos = tl.load(npos_ptr + offs_m, mask=row_ok, other=0)
    g = tl.load(g_ptr + offs_m, mask=row_ok, other=0.0).to(ACC)
    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=ACC)
    gsum = tl.zeros((BLOCK_M,), dtype=ACC)
    for n0 in range(0, M, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        lab_n = tl.load(rlab_ptr + offs_n, mask=offs_n < M, other=0)
        s = sim_tile(x_ptr, r_ptr, offs_m, offs_n, B, M, D, stride_x, stride_r,
                     BLOCK_M, BLOCK_N, BLOCK_D, ACC, PRECISION)
        gt = _tri_grad_tile(s, offs_m, offs_n, row_ok, lab_m, lab_n, g, npos, srank, kp_ptr,
                            w_ptr, crank_ptr, prm_ptr, nrm_ptr, B, M, PMAX, PS, COSINE,
                            EXCLUDE_DIAG, MINE, RAW)
        acc = add_tile_product(acc, gt, r_ptr, offs_n, M, D, stride_r, BLOCK_DO, PRECISION)
        if RAW:
            gsum += tl.sum(gt, 1)
    offs_d = tl.arange(0, BLOCK_DO)
    if RAW:
        acc = minus_radial(acc, gsum, x_ptr, offs_m, B, D, stride_x, BLOCK_DO, ACC)
    tl.store(dx_ptr + offs_m[:, None] * stride_dx + offs_d[None, :], acc,
             mask=row_ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def _tri_grad_dr_kernel(x_ptr, r_ptr, lab_ptr, rlab_ptr, crank_ptr, srank_ptr, npos_ptr,
                        g_ptr, prm_ptr, nrm_ptr, kp_ptr, w_ptr, dr_ptr, B, M, D, stride_x,
                        stride_r, stride_dr, PMAX, PS, COSINE: tl.constexpr,
                        EXCLUDE_DIAG: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_DO: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                        MINE: tl.constexpr = 0, RAW: tl.constexpr = False):
    """dR = Gᵀ X: one program per BLOCK_N reference rows, streaming the anchor tiles (RAW:
    less (Σ_i G_ij) r_j, as the dX kernel)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < M
    lab_n = tl.load(rlab_ptr + offs_n, mask=col_ok, other=0)
    acc = tl.zeros((BLOCK_N, BLOCK_DO), dtype=ACC)
    gsum = tl.zeros((BLOCK_N,), dtype=ACC)
    for m0 in range(0, B, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < B
        lab_m = tl.load(lab_ptr + offs_m, mask=row_ok, other=0)
        srank = tl.load(srank_ptr + offs_m, mask=row_ok, other=0)
        npos = tl.load(npos_ptr + offs_m, mask=row_ok, other=0)
        g = tl.load(g_ptr + offs_m, mask=row_ok, other=0.0).to(ACC)
        s = sim_tile(x_ptr, r_ptr, offs_m, offs_n, B, M, D, stride_x, stride_r,
                     BLOCK_M, BLOCK_N, BLOCK_D, ACC, PRECISION)
        gt = _tri_grad_tile(s, offs_m, offs_n, row_ok, lab_m, lab_n, g, npos, srank, kp_ptr,
                            w_ptr, crank_ptr, prm_ptr, nrm_ptr, B, M, PMAX, PS, COSINE,
                            EXCLUDE_DIAG, MINE, RAW)
        acc = add_tile_product(acc, tl.trans(gt), x_ptr, offs_m, B, D, stride_x, BLOCK_DO,
                               PRECISION)
        if RAW:
            gsum += tl.sum(gt, 0)
    offs_d = tl.arange(0, BLOCK_DO)
    if RAW:
        acc = minus_radial(acc, gsum, r_ptr, offs_n, M, D, stride_r, BLOCK_DO, ACC)
    tl.store(dr_ptr + offs_n[:, None] * stride_dr + offs_d[None, :], acc,
             mask=col_ok[:, None] & (offs_d[None, :] < D))


def _positive_layout(labels, ref_labels, exclude_diag):
    """Host-side (O((B+M) log M), no B×M): each column's rank within its class (column
    order), each row's own-column rank when that column is an excluded positive (else M,
    past every rank), each row's number of positives and negatives."""
    m = ref_labels.shape[0]
    order = torch.sort(ref_labels, stable=True).indices
    srt = ref_labels[order]
    first = torch.searchsorted(srt, srt)  # first position of each column's class
    crank = torch.empty_like(ref_labels)
    crank[order] = torch.arange(m, device=ref_labels.device) - first
    per_row = torch.searchsorted(srt, labels, right=True) - torch.searchsorted(srt, labels)
    b = labels.shape[0]
    if exclude_diag:
        self_pos = ref_labels[:b] == labels
        srank = torch.where(self_pos, crank[:b], torch.full_like(labels, m))
        npos = per_row - self_pos.long()
        nneg = m - per_row - (~self_pos).long()
    else:
        srank = torch.full_like(labels, m)
        npos, nneg = per_row, m - per_row
    return crank, srank, npos, nneg


def _side_buffers(x, r, labels, ref_labels, exclude_diag, cosine, prm, counts, mine=0,
                  raw=False):
    """Kernel A's positive-key table kp (B × P_max, in the accumulation type), then kernel
    B's per-row (sum, #active, #triplets) or, with `counts`, each positive's active negatives
    (B × P_max int32): (kp, layout, rows, nonzero, cnt, triplets), layout (crank, srank,
    npos, nneg, pmax, ps, the rows' squared norms). mine: 0, or 1 + the TripletMarginMiner
    kind (the triplets it keeps only; its margin is prm[2]). raw: rows of any norm (_tri_key)."""
    b, m, d = x.shape[0], r.shape[0], x.shape[1]

    def layout():
        crank, srank, npos, nneg = _positive_layout(labels, ref_labels, exclude_diag)
        # rows with no negative have no triplet: their positives need no slot
        npos = torch.where(nneg > 0, npos, torch.zeros_like(npos))
        # the largest class's slot count sizes the buffers: a host read
        return crank, srank, npos, nneg, (int(npos.max()) if b > 0 else 0)
    # made by the forward and handed to the backward (table_cache), so that the backward
    # drains no queue and queues none of the layout's ~15 small ops again
    crank, srank, npos, nneg, pmax = table_cache.handed(
        (labels, ref_labels), ("triplet layout", bool(exclude_diag)), layout, backward=counts)
    ps = max(pmax, 1)
    cfg, _, warps = launch_config(x, r)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    kp = torch.empty(b, ps, dtype=acc, device=x.device)
    grid = (triton.cdiv(b, cfg["BLOCK_M"]),)
    nrm = sq_norms(x, r)
    common = dict(COSINE=cosine, EXCLUDE_DIAG=exclude_diag, RAW=raw, **cfg, **warps)
    rows = torch.zeros(b, dtype=acc, device=x.device)
    nz = torch.zeros(b, dtype=torch.long, device=x.device)
    trip = npos * nneg if mine == 0 else torch.zeros(b, dtype=torch.long, device=x.device)
    cnt = None
    if pmax == 0:
        return kp, (crank, srank, npos, nneg, pmax, ps, nrm), rows, nz, cnt, trip
    _tri_pos_keys_kernel[grid](x, r, labels, ref_labels, crank, srank, npos, prm, nrm, kp, b, m,
                               d,
                               x.stride(0), r.stride(0), ps, **common)
    if counts:
        cnt = torch.zeros(b, ps, dtype=torch.int32, device=x.device)
        block_p = min(16, next_pow2(pmax))
        _tri_pos_counts_kernel[(grid[0], triton.cdiv(pmax, block_p))](
            x, r, labels, ref_labels, npos, prm, nrm, kp, cnt, b, m, d, x.stride(0), r.stride(0),
            ps, BLOCK_P=block_p, MINE=mine, **common)
    else:
        _tri_fwd_kernel[grid](x, r, labels, ref_labels, npos, prm, nrm, kp, rows, nz, trip, b, m,
                              d, x.stride(0), r.stride(0), pmax, ps, MINE=mine, **common)
    return kp, (crank, srank, npos, nneg, pmax, ps, nrm), rows, nz, cnt, trip


def _tri_forward(x, r, labels, ref_labels, exclude_diag, cosine, prm, mine=0, raw=False):
    _, _, rows, nz, _, trip = _side_buffers(x, r, labels, ref_labels, exclude_diag, cosine,
                                            prm, False, mine, raw)
    return rows, nz, trip


def _tri_backward(g, x, r, labels, ref_labels, exclude_diag, cosine, prm, need_x, need_r,
                  mine=0, raw=False):
    b, m, d = x.shape[0], r.shape[0], x.shape[1]
    dx = torch.zeros_like(x) if need_x else None
    dr = torch.zeros_like(r) if need_r else None
    kp, (crank, srank, npos, _, pmax, ps, nrm), _, _, cnt, _ = _side_buffers(
        x, r, labels, ref_labels, exclude_diag, cosine, prm, True, mine, raw)
    if pmax == 0:  # no triplet: zero gradients
        return dx, dr
    g = g.to(kp.dtype).contiguous()
    # the positives' weights g_i · #active negatives · dk/ds, by rank (0 past npos_i)
    slot = torch.arange(ps, device=x.device)[None, :] < npos[:, None]
    if cosine:
        kgrad = torch.full_like(kp, -1.0)
    else:
        kgrad = torch.where(kp > 0, -1.0 / torch.where(kp > 0, kp, torch.ones_like(kp)),
                            torch.zeros_like(kp))
    w = torch.where(slot, g[:, None] * cnt.to(kp.dtype) * kgrad, torch.zeros_like(kp))
    w = w.contiguous()
    cfg, block_do, warps = launch_config(x, r, grad=True)
    args = (x, r, labels, ref_labels, crank, srank, npos, g, prm, nrm, kp, w)
    meta = dict(COSINE=cosine, EXCLUDE_DIAG=exclude_diag, BLOCK_DO=block_do, MINE=mine,
                RAW=raw, **cfg, **warps)
    if need_x:
        dx = torch.empty_like(x)
        _tri_grad_dx_kernel[(triton.cdiv(b, cfg["BLOCK_M"]),)](
            *args, dx, b, m, d, x.stride(0), r.stride(0), dx.stride(0), pmax, ps, **meta)
    if need_r:
        dr = torch.empty_like(r)
        _tri_grad_dr_kernel[(triton.cdiv(m, cfg["BLOCK_N"]),)](
            *args, dr, b, m, d, x.stride(0), r.stride(0), dr.stride(0), pmax, ps, **meta)
    return dx, dr


def _constants(x, margin, mine_margin=0.0, raw=False):
    # L2: d² = ‖x‖² + ‖r‖² − 2s below 8·√D ulps of the accumulation type is rounding (the
    # norms and s sum the same products in different orders), taken as 0; raw rows: below
    # tiles.raw_zero_eps of max(‖x_i‖², ‖r_j‖²) (_tri_key); then the miner's margin
    # (compared in the accumulation type)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    eps = raw_zero_eps(x) if raw else 8 * max(1.0, x.shape[1] ** 0.5) * torch.finfo(acc).eps
    return loss_constants(torch.empty(0, dtype=acc, device=x.device), margin, eps, mine_margin)


def _acc_dtype(x):  # fp16/bf16 rows are summed in fp32, as the CPU op
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check(x, r, labels, ref_labels, exclude_diag):
    if x.dim() != 2 or r.dim() != 2 or x.shape[1] != r.shape[1]:
        raise ValueError(f"x and r must be 2-D with one width, got {tuple(x.shape)} and "
                         f"{tuple(r.shape)}")
    if labels.shape != (x.shape[0],) or ref_labels.shape != (r.shape[0],):
        raise ValueError("labels and ref_labels must be 1-D, one per row of x and r")
    if exclude_diag and x.shape[0] > r.shape[0]:
        raise ValueError("exclude_diag needs r to start with the batch (at least as many "
                         "rows as x)")


_FWD = "metrix_ops::triton_triplet_all_rows"


@triton_op(_FWD, host_reads=True)
def _tri_rows_op(x: torch.Tensor, r: torch.Tensor, labels: torch.Tensor,
                 ref_labels: torch.Tensor, exclude_diag: bool, cosine: bool, margin: float,
                 mine: int = 0, mine_margin: float = 0.0, raw: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per anchor (Σ active terms, #active, #triplets); mine: 0 (every triplet) or 1 + a
    TripletMarginMiner kind (MINE_KINDS) with its margin: the triplets that miner keeps.
    raw: L2 of rows of any norm (the threshold of d = 0 and the gradient's radial part)."""
    _check(x, r, labels, ref_labels, exclude_diag)
    x, r = x.contiguous(), r.contiguous()
    return _tri_forward(x, r, labels.contiguous().long(), ref_labels.contiguous().long(),
                        exclude_diag, cosine, _constants(x, margin, mine_margin, raw), mine,
                        raw)


@_tri_rows_op.register_fake
def _(x, r, labels, ref_labels, exclude_diag, cosine, margin, mine=0, mine_margin=0.0,
      raw=False):
    b = x.shape[0]
    return (x.new_empty(b, dtype=_acc_dtype(x)), x.new_empty(b, dtype=torch.long),
            x.new_empty(b, dtype=torch.long))


@triton_op("metrix_ops::triton_triplet_all_rows_bwd", host_reads=True)
def _tri_rows_bwd_op(g_rows: torch.Tensor, x: torch.Tensor, r: torch.Tensor,
                     labels: torch.Tensor, ref_labels: torch.Tensor, exclude_diag: bool,
                     cosine: bool, margin: float, need_x: bool, need_r: bool, mine: int = 0,
                     mine_margin: float = 0.0, raw: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    x, r = x.contiguous(), r.contiguous()
    dx, dr = _tri_backward(g_rows.contiguous(), x, r, labels.contiguous().long(),
                           ref_labels.contiguous().long(), exclude_diag, cosine,
                           _constants(x, margin, mine_margin, raw), need_x, need_r, mine, raw)
    return grads_or_empty(dx, dr, x)


@_tri_rows_bwd_op.register_fake
def _(g_rows, x, r, labels, ref_labels, exclude_diag, cosine, margin, need_x, need_r, mine=0,
      mine_margin=0.0, raw=False):
    return fake_grads(x, r, need_x, need_r)


def _tri_setup(ctx, inputs, output):
    x, r, labels, ref_labels, *consts = inputs
    ctx.save_for_backward(x, r, labels, ref_labels)
    ctx.consts = tuple(consts[:3])  # exclude_diag, cosine, margin
    ctx.mine = tuple(consts[3:])    # the miner's kind and margin, and raw, when given
    ctx.mark_non_differentiable(output[1], output[2])


def _tri_backward_rule(ctx, g_rows, _g_nz, _g_n):
    need_x, need_r = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx, dr = torch.ops.metrix_ops.triton_triplet_all_rows_bwd(
        g_rows, *ctx.saved_tensors, *ctx.consts, need_x, need_r, *ctx.mine)
    return ((dx if need_x else None), (dr if need_r else None)) + (None,) * (5 + len(ctx.mine))


register_autograd(_FWD, _tri_backward_rule, setup_context=_tri_setup)


def triplet_mined_rows_triton(x_unit, r_unit, labels, ref_labels, exclude_diag: bool,
                              cosine: bool, margin: float, type_of_triplets: str,
                              mine_margin: float, raw: bool = False):
    """triplet_all_rows_triton over the triplets TripletMarginMiner(mine_margin,
    type_of_triplets) keeps (the miner on the loss's distance): per-anchor (Σ active terms,
    #active, #kept triplets)."""
    from ..ops.triplet_mined import MINE_KINDS
    return call(torch.ops.metrix_ops.triton_triplet_all_rows,
        x_unit, r_unit, labels, ref_labels, bool(exclude_diag), bool(cosine), float(margin),
        1 + MINE_KINDS[type_of_triplets], float(mine_margin), bool(raw))


def triplet_all_rows_triton(x_unit, r_unit, labels, ref_labels, exclude_diag: bool,
                            cosine: bool, margin: float, raw: bool = False):
    """The Triton twin of ops.triplet_all_rows: per-anchor (Σ_{p,n} [violation]₊ in fp32 or
    fp64, #triplets with loss > 0, #triplets) over all triplets of unit rows x_unit against
    unit rows r_unit (raw: the L2 of rows of any norm); differentiable in both (one tensor
    passed twice gets both parts)."""
    if not raw:
        return call(torch.ops.metrix_ops.triton_triplet_all_rows,
            x_unit, r_unit, labels, ref_labels, bool(exclude_diag), bool(cosine), float(margin))
    return call(torch.ops.metrix_ops.triton_triplet_all_rows,
        x_unit, r_unit, labels, ref_labels, bool(exclude_diag), bool(cosine), float(margin),
        0, 0.0, True)


def supports(params, inp, expansion) -> bool:
    """Cosine, the L2 and squared L2 of unit rows, and the L2 or squared L2 of raw rows (the
    rows themselves, `raw`; the squared form through the cosine keys, _tri_key)."""
    x = inp.embeddings
    return (expansion is None and inp.indices_tuple is None and inp.labels is not None
            and params.get("triplets_per_anchor", "all") == "all"
            and not params.get("swap", False) and not params.get("smooth_loss", False)
            and op_kind(inp, any_device=True) is not None
            and x.shape[1] <= max_dim(x.dtype) and usable_on(x.device, x.dtype))


def impl(params, inp, reducer):
    raw = op_kind(inp, any_device=True) in ("raw", "rawsq")
    return totals_impl(functools.partial(triplet_all_rows_triton, raw=raw), params, inp,
                       reducer, any_device=True)

fused.register("triton", "TripletMarginLoss", supports, impl)
