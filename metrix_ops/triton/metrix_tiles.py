"""The loss-independent part of embedding-level Metrix on the Triton engine (pairs "pos_neg"
or "anchor_neg", DESIGN §3), for a label-sorted batch against itself: the chunk table, and
the @triton.jit helpers that give a chunk's candidates in closed form and take a candidate
weight w = ∂L/∂s̃ back into the Gram entries. A loss module (ms_metrix.py) supplies its fold
of the candidates and its weight.

Layout. The batch is sorted by label and cut into chunks of at most KB rows that hold whole
classes (several small classes share a chunk). A chunk's rows are its anchors and, since an
anchor's positives are in its own class, also all their positives. Against a column tile N
of the batch (BLOCK_N rows), one tl.dot gives S_chunk,N, and with it every candidate of the
chunk's anchors against those columns: for anchor i, positive j (both chunk rows) and
negative n,

    s̃(i, j, n) = r_jn (λ s_ij + (1−λ) s_in),   r_jn = 1/‖λ x_j + (1−λ) x_n‖ (from s_jn),

a KB×KB×BLOCK_N tensor, no product beyond the chunk's own S tile. For an anchor without a
positive (a class of one), and for every anchor under "anchor_neg", the one "positive" is
the anchor itself (s_ii = 1): the mix of a with each negative.

Gradient (the chain rule of the mix, as the CPU kernels' MixLanes::grad):
∂s̃/∂s_in = (1−λ) r_jn, ∂s̃/∂s_jn = −s̃ λ(1−λ) r_jn² (0 where ‖v‖ is clamped at ε),
∂s̃/∂s_ij = λ r_jn. So a tile's weights give a ∂L/∂S tile on the chunk's rows (its anchors'
entries (i, n) and its positives' entries (j, n)) and a KB×KB within-chunk block.

Classes are at most 64 rows (KB ≤ 64: the candidate tensor is KB²·BLOCK_N); a batch with a
larger class is not covered (the driver takes the next engine)."""
from __future__ import annotations

import torch

from .launch import HAS_TRITON, next_pow2

MAX_CLASS = 64
MIX_EPS = 1e-12  # as F.normalize and the CPU kernels (common/metrix_mix.h kMixEps)


def chunk_table(sorted_labels: torch.Tensor):
    """(chunk starts with the end appended, as int32 on the labels' device; KB): whole
    classes of the sorted labels packed greedily into chunks of at most KB rows, KB the
    smallest power of two ≥ 16 (tl.dot's least) that holds the largest class. None when a
    class is larger than MAX_CLASS."""
    counts = torch.unique_consecutive(sorted_labels, return_counts=True)[1].tolist()
    biggest = max(counts, default=1)
    if biggest > MAX_CLASS:
        return None
    kb = max(16, next_pow2(biggest))
    starts, row = [0], 0
    for c in counts:
        if row + c - starts[-1] > kb:  # the class does not fit: it opens the next chunk
            starts.append(row)
        row += c
    starts.append(row)
    return torch.tensor(starts, dtype=torch.int32, device=sorted_labels.device), kb


def class_sizes(sorted_labels: torch.Tensor) -> torch.Tensor:
    """Each row's class size (int32), for the rule "no positive: mix the anchor itself"."""
    _, inverse, counts = torch.unique_consecutive(sorted_labels, return_inverse=True,
                                                  return_counts=True)
    return counts[inverse].to(torch.int32)


if HAS_TRITON:
    import triton
    import triton.language as tl

    from .tiles import sim_tile

    _EPS2 = tl.constexpr(MIX_EPS * MIX_EPS)
    _CLAMPED = tl.constexpr(0.5 / MIX_EPS)  # r above this is 1/ε: ‖v‖ was clamped

    @triton.jit
    def chunk_rows(chunk_ptr, c, lab_ptr, cnt_ptr, x_ptr, D, stride_x, ANCHOR_NEG: tl.constexpr,
                   KB: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
                   PRECISION: tl.constexpr):
        """Chunk c's rows and what every tile of it shares: (offs_k, end, its labels, the
        anchor–positive mask pm (KB×KB), s_ij with s_ii = 1)."""
        c0 = tl.load(chunk_ptr + c)
        c1 = tl.load(chunk_ptr + c + 1)
        offs_k = c0 + tl.arange(0, KB)
        row_ok = offs_k < c1
        lab_k = tl.load(lab_ptr + offs_k, mask=row_ok, other=-1)
        cnt_k = tl.load(cnt_ptr + offs_k, mask=row_ok, other=0)
        w = sim_tile(x_ptr, x_ptr, offs_k, offs_k, c1, c1, D, stride_x, stride_x,
                     KB, KB, BLOCK_D, ACC, PRECISION)
        diag = offs_k[:, None] == offs_k[None, :]
        same = (lab_k[:, None] == lab_k[None, :]) & row_ok[:, None] & row_ok[None, :]
        if ANCHOR_NEG:
            pm = same & diag
        else:  # positives, or the anchor itself when it has none
            pm = same & tl.where(cnt_k[:, None] > 1, ~diag, diag)
        sap = tl.where(diag, 1.0, w)
        return offs_k, c1, lab_k, pm, sap

    @triton.jit
    def candidate_tile(x_ptr, lab_ptr, offs_k, c1, lab_k, pm, sap, n0, B, D, stride_x, lam,
                       KB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       ACC: tl.constexpr, PRECISION: tl.constexpr):
        """The chunk's candidates against columns n0..n0+BLOCK_N: (s̃ as KB(i)×KB(j)×BLOCK_N,
        the candidate mask, r_jn (KB×BLOCK_N), offs_n)."""
        offs_n = n0 + tl.arange(0, BLOCK_N)
        col_ok = offs_n < B
        lab_n = tl.load(lab_ptr + offs_n, mask=col_ok, other=-1)
        s = sim_tile(x_ptr, x_ptr, offs_k, offs_n, c1, B, D, stride_x, stride_x,
                     KB, BLOCK_N, BLOCK_D, ACC, PRECISION)
        q = (lam * lam + (1 - lam) * (1 - lam)) + (2 * lam * (1 - lam)) * s
        r = 1.0 / tl.sqrt(tl.maximum(q, _EPS2))  # 1/max(‖v‖, ε)
        neg = col_ok[None, :] & (lab_k[:, None] != lab_n[None, :])  # padding rows: pm is 0
        v = r[None, :, :] * (lam * sap[:, :, None] + (1 - lam) * s[:, None, :])
        ok = pm[:, :, None] & neg[:, None, :]
        return v, ok, r, offs_n

    @triton.jit
    def candidate_grads(w, v, r, lam):
        """From candidate weights w (KB×KB×BLOCK_N, 0 off the candidates): the ∂L/∂S tile of
        the chunk's rows against the columns (anchor entries (i, n) plus positive entries
        (j, n)) and the within-chunk block ∂L/∂s_ij (KB×KB)."""
        u = w * r[None, :, :]  # w/‖v‖, which every entry's term shares
        g_anchor = (1 - lam) * tl.sum(u, axis=1)
        coef = tl.where(r < _CLAMPED, -lam * (1 - lam) * r, 0.0)
        g_pos = tl.sum(u * v, axis=0) * coef
        g_within = lam * tl.sum(u, axis=2)
        return g_anchor + g_pos, g_within
