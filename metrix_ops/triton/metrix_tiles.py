"""The loss-independent part of embedding-level Metrix on the Triton engine (pairs "pos_neg"
or "anchor_neg", DESIGN §3), for a label-sorted batch against itself: the chunk table, and
the @triton.jit helpers that give a chunk's candidates in closed form and take a candidate
weight w = ∂L/∂s̃ back into the Gram entries. A loss module (ms_metrix.py) supplies its fold
of the candidates and its weight.

Layout. The batch is sorted by label and cut into chunks of at most KB rows that hold whole
classes (several small classes share a chunk), or blocks of a class too large for one
(below). A chunk's rows are its anchors and, when it holds whole classes, since an anchor's
positives are in its own class, also all their positives. Against a column tile N
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

The backward kernels are shared (mix_grads): a loss supplies its candidate weight as a
@triton.jit function WEIGHTS(v, ok, a, b, c, prm_ptr) of three per-anchor vectors (its
upstream gradients and saved row statistics) and its constants, as the clean pair losses
supply their G tile to pairs.py.

Large classes. Classes of at most MAX_CLASS rows stay whole in one chunk (the candidate
tensor is KB²·BLOCK_N). A larger class is cut into blocks of SPLIT_KB rows, each a chunk of
anchors whose positives range over the whole class (chunk_table); the kernels then loop over
the class's blocks, with a second S tile for the positives' rows (SPLIT), and the gradient's
row programs take each pair of blocks both ways, so that every row still has one writer. The
chunk table is built inside the ops, so the modules trace under torch.compile."""
from __future__ import annotations

import torch

from ..ops.autograd import call, register_autograd
from . import table_cache
from .launch import HAS_TRITON, next_pow2
from .pairs import launch_config
from ..host_read import host_list

MAX_CLASS = 64  # the largest class a chunk holds whole; larger ones are cut into blocks
# the block height when a class is cut: ptxas for sm_90 (D = 512, 8 warps, 16 columns) gives
# the cut path's gradient row kernel 888 bytes of spills at 16 rows and 7148 at 32
SPLIT_KB = 16
MIX_EPS = 1e-12  # as F.normalize and the CPU kernels (common/metrix_mix.h kMixEps)


def _class_sizes(sorted_labels):
    """(each class's size as a list, each row's class size as int32) of sorted labels."""
    _, inverse, sizes = torch.unique_consecutive(sorted_labels, return_inverse=True,
                                                 return_counts=True)
    return host_list(sizes), sizes[inverse].to(torch.int32)


def chunk_table(sorted_labels: torch.Tensor, anchor_neg: bool):
    """(the chunk table, int32 on the labels' device: per chunk its anchor rows [a0, a1) and
    the range [p0, p1) its positives come from, flattened; KB; each row's class size, int32,
    for the rule "no positive: mix the anchor itself"; SPLIT, whether a chunk's positives may
    be rows of other chunks).

    With every class at most MAX_CLASS rows, whole classes are packed greedily into chunks of
    at most KB rows, KB the smallest power of two ≥ 16 (tl.dot's least) that holds the largest
    class, and each chunk's positives are its own rows (p = a). Otherwise KB = SPLIT_KB: classes
    of at most KB rows are packed as before, and a larger class is cut into blocks of KB rows
    whose positives range over the whole class (SPLIT; the kernels then loop over the class's
    blocks). Under anchor_neg an anchor's one "positive" is itself, so the blocks of a cut
    class keep p = a and nothing is split.

    Built inside the ops (eager there, so the table may depend on the labels' values and the
    modules trace under torch.compile(fullgraph=True))."""
    counts, row_counts = _class_sizes(sorted_labels)
    biggest = max(counts, default=1)
    cut = biggest > MAX_CLASS
    kb = SPLIT_KB if cut else max(16, next_pow2(biggest))
    table, start, row = [], 0, 0
    for c in counts:
        if c > kb:  # a cut class: it closes the open chunk and takes blocks of its own
            if row > start:
                table.append((start, row, start, row))
            for a0 in range(row, row + c, kb):
                a1 = min(a0 + kb, row + c)
                table.append((a0, a1, a0, a1) if anchor_neg else (a0, a1, row, row + c))
            start = row + c
        elif row + c - start > kb:  # the class does not fit: it opens the next chunk
            table.append((start, row, start, row))
            start = row
        row += c
    if row > start:
        table.append((start, row, start, row))
    flat = torch.tensor(table, dtype=torch.int32, device=sorted_labels.device).reshape(-1)
    split = any(p0 != a0 or p1 != a1 for a0, a1, p0, p1 in table)
    return flat, kb, row_counts, split


def run_sorted(op, x_unit, labels, pairs: str, *consts):
    """op(xs, ys, *consts, anchor_neg) on the label-sorted batch (the op builds its chunk
    table: chunk_table), its per-anchor outputs back in the caller's order."""
    from ..ops.ms_metrix import label_sorted
    if pairs not in ("pos_neg", "anchor_neg"):
        raise ValueError(f"pairs must be 'pos_neg' or 'anchor_neg', got {pairs!r}")
    xs, ys, inverse = label_sorted(x_unit, labels)
    out = call(op, xs, ys, *consts, pairs == "anchor_neg")
    return tuple(t.index_select(0, inverse) for t in out)


def covers(clean_supports, params, inp, expansion, metrix) -> bool:
    """A Metrix loss of this engine covers the call: its clean loss does, embedding level,
    pos_neg or anchor_neg, the batch against itself (any class sizes)."""
    from ..fused.multi_similarity import self_pairs
    return (clean_supports(params, inp, expansion) and metrix.level == "embedding"
            and metrix.pairs in ("pos_neg", "anchor_neg") and self_pairs(inp))


def register_lse_autograd(fwd_name: str, bwd_op, n_inputs: int):
    """Autograd for an op returning (rows, lse⁺, lse⁻) per anchor of inputs (x, labels,
    *constants): rows differentiable, the lses saved for bwd_op(g_rows, x, labels, lse⁺,
    lse⁻, *constants) → dx."""
    def setup(ctx, inputs, output):
        x, labels, *consts = inputs
        ctx.save_for_backward(x, labels, output[1], output[2])
        ctx.consts = tuple(consts)
        ctx.mark_non_differentiable(output[1], output[2])

    def backward(ctx, g_rows, _g_lp, _g_ln):
        return (bwd_op(g_rows, *ctx.saved_tensors, *ctx.consts),) + (None,) * (n_inputs - 1)

    register_autograd(fwd_name, backward, setup_context=setup)


if HAS_TRITON:
    import triton
    import triton.language as tl

    from .tiles import add_tile_product, sim_tile

    _EPS2 = tl.constexpr(MIX_EPS * MIX_EPS)
    _CLAMPED = tl.constexpr(0.5 / MIX_EPS)  # r above this is 1/ε: ‖v‖ was clamped

    @triton.jit
    def chunk_rows(chunk_ptr, c, lab_ptr, cnt_ptr, KB: tl.constexpr):
        """Chunk c's anchor rows: (offs_k, their end a1, labels, class sizes, the range
        [p0, p1) of its positives' rows)."""
        a0 = tl.load(chunk_ptr + 4 * c)
        a1 = tl.load(chunk_ptr + 4 * c + 1)
        p0 = tl.load(chunk_ptr + 4 * c + 2)
        p1 = tl.load(chunk_ptr + 4 * c + 3)
        offs_k = a0 + tl.arange(0, KB)
        row_ok = offs_k < a1
        lab_k = tl.load(lab_ptr + offs_k, mask=row_ok, other=-1)
        cnt_k = tl.load(cnt_ptr + offs_k, mask=row_ok, other=0)
        return offs_k, a1, lab_k, cnt_k, p0, p1

    @triton.jit
    def pos_block(x_ptr, lab_ptr, offs_k, a1, lab_k, cnt_k, p, p1, D, stride_x,
                  ANCHOR_NEG: tl.constexpr, KB: tl.constexpr, BLOCK_D: tl.constexpr,
                  ACC: tl.constexpr, PRECISION: tl.constexpr):
        """The anchors offs_k against a block of KB candidate positives from row p (< p1):
        (offs_p, their labels, the anchor–positive mask pm (KB×KB), s_ij with s_ii = 1)."""
        offs_p = p + tl.arange(0, KB)
        p_ok = offs_p < p1
        lab_p = tl.load(lab_ptr + offs_p, mask=p_ok, other=-1)
        w = sim_tile(x_ptr, x_ptr, offs_k, offs_p, a1, p1, D, stride_x, stride_x,
                     KB, KB, BLOCK_D, ACC, PRECISION)
        diag = offs_k[:, None] == offs_p[None, :]
        same = (lab_k[:, None] == lab_p[None, :]) & (offs_k < a1)[:, None] & p_ok[None, :]
        if ANCHOR_NEG:
            pm = same & diag
        else:  # positives, or the anchor itself when it has none
            pm = same & tl.where(cnt_k[:, None] > 1, offs_k[:, None] != offs_p[None, :], diag)
        sap = tl.where(diag, 1.0, w)
        return offs_p, lab_p, pm, sap

    @triton.jit
    def col_sims(x_ptr, lab_ptr, offs_r, r1, n0, B, D, stride_x, KB: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
                 PRECISION: tl.constexpr):
        """Rows offs_r (< r1) against the columns n0..n0+BLOCK_N: (S tile, offs_n, the
        columns' labels, -1 past B)."""
        offs_n = n0 + tl.arange(0, BLOCK_N)
        lab_n = tl.load(lab_ptr + offs_n, mask=offs_n < B, other=-1)
        s = sim_tile(x_ptr, x_ptr, offs_r, offs_n, r1, B, D, stride_x, stride_x,
                     KB, BLOCK_N, BLOCK_D, ACC, PRECISION)
        return s, offs_n, lab_n

    @triton.jit
    def mix_candidates(s_a, s_p, lab_k, lab_n, offs_n, B, pm, sap, lam):
        """Candidates of anchors (rows of s_a) with positives (rows of s_p) against the
        columns: (s̃ as KB(i)×KB(j)×BLOCK_N, the candidate mask, r_jn (KB×BLOCK_N))."""
        q = (lam * lam + (1 - lam) * (1 - lam)) + (2 * lam * (1 - lam)) * s_p
        r = 1.0 / tl.sqrt(tl.maximum(q, _EPS2))  # 1/max(‖v‖, ε)
        neg = (offs_n < B)[None, :] & (lab_k[:, None] != lab_n[None, :])  # padding: pm is 0
        v = r[None, :, :] * (lam * sap[:, :, None] + (1 - lam) * s_a[:, None, :])
        ok = pm[:, :, None] & neg[:, None, :]
        return v, ok, r

    @triton.jit
    def candidate_tile(x_ptr, lab_ptr, offs_k, a1, lab_k, offs_p, p1, pm, sap, n0, B, D,
                       stride_x, lam, SPLIT: tl.constexpr, KB: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
                       PRECISION: tl.constexpr):
        """The candidates of anchors offs_k with positives offs_p against columns
        n0..n0+BLOCK_N: (s̃, mask, r_jn, offs_n; as mix_candidates), and the two S tiles. Without
        SPLIT the positives are the anchors' own rows and one S tile serves both."""
        s_a, offs_n, lab_n = col_sims(x_ptr, lab_ptr, offs_k, a1, n0, B, D, stride_x, KB,
                                      BLOCK_N, BLOCK_D, ACC, PRECISION)
        if SPLIT:
            s_p, _, _ = col_sims(x_ptr, lab_ptr, offs_p, p1, n0, B, D, stride_x, KB, BLOCK_N,
                                 BLOCK_D, ACC, PRECISION)
        else:
            s_p = s_a
        v, ok, r = mix_candidates(s_a, s_p, lab_k, lab_n, offs_n, B, pm, sap, lam)
        return v, ok, r, offs_n, s_a, s_p, lab_n

    @triton.jit
    def fold3(m, t, x):
        """An online log-sum-exp per anchor (running max m, Σ e^{·−m}) folding a KB×KB×N
        tile x; a state started at (−inf, 0) stays so until a finite term comes."""
        m_new = tl.maximum(m, tl.max(tl.max(x, axis=2), axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        e = tl.exp(x - m_safe[:, None, None])
        return m_new, t * tl.exp(m - m_safe) + tl.sum(tl.sum(e, axis=2), axis=1)

    @triton.jit
    def candidate_grads(w, v, r, lam):
        """From candidate weights w (KB×KB×BLOCK_N, 0 off the candidates): the ∂L/∂S tiles of
        the anchors' entries (i, n) and of the positives' entries (j, n) against the columns,
        and the block ∂L/∂s_ij (KB×KB)."""
        u = w * r[None, :, :]  # w/‖v‖, which every entry's term shares
        g_anchor = (1 - lam) * tl.sum(u, axis=1)
        coef = tl.where(r < _CLAMPED, -lam * (1 - lam) * r, 0.0)
        g_pos = tl.sum(u * v, axis=0) * coef
        g_within = lam * tl.sum(u, axis=2)
        return g_anchor, g_pos, g_within

    @triton.jit
    def _chunk_vecs(a_ptr, b_ptr, c_ptr, offs_k, row_ok, ACC: tl.constexpr):
        a = tl.load(a_ptr + offs_k, mask=row_ok, other=0.0).to(ACC)
        b = tl.load(b_ptr + offs_k, mask=row_ok, other=0.0).to(ACC)
        c = tl.load(c_ptr + offs_k, mask=row_ok, other=0.0).to(ACC)
        return a, b, c

    @triton.jit
    def _rows_against_block(acc, x_ptr, lab_ptr, cnt_ptr, prm_ptr, a_ptr, b_ptr, c_ptr, offs_k,
                            a0, a1, lab_k, cnt_k, a, b, c, lam, p, p1, B, D, stride_x,
                            WEIGHTS: tl.constexpr, ANCHOR_NEG: tl.constexpr,
                            SPLIT: tl.constexpr, KB: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, ACC: tl.constexpr,
                            PRECISION: tl.constexpr):
        """acc + the dX of the anchors offs_k (rows R) from the block of positives at p."""
        offs_p, lab_p, pm, sap = pos_block(x_ptr, lab_ptr, offs_k, a1, lab_k, cnt_k, p, p1, D,
                                           stride_x, ANCHOR_NEG, KB, BLOCK_D, ACC, PRECISION)
        if SPLIT:  # the reverse tile's anchors P: their vectors and masks
            p_ok = offs_p < p1
            cnt_p = tl.load(cnt_ptr + offs_p, mask=p_ok, other=0)
            ap, bp, cp = _chunk_vecs(a_ptr, b_ptr, c_ptr, offs_p, p_ok, ACC)
            offs_q, lab_q, pm_r, sap_r = pos_block(x_ptr, lab_ptr, offs_p, p1, lab_p, cnt_p, a0,
                                                   a1, D, stride_x, ANCHOR_NEG, KB, BLOCK_D,
                                                   ACC, PRECISION)
        gw = tl.zeros((KB, KB), dtype=ACC)
        for n0 in range(0, B, BLOCK_N):
            v, ok, r, offs_n, s_a, s_p, lab_n = candidate_tile(
                x_ptr, lab_ptr, offs_k, a1, lab_k, offs_p, p1, pm, sap, n0, B, D, stride_x,
                lam, SPLIT, KB, BLOCK_N, BLOCK_D, ACC, PRECISION)
            g_anc, g_pos, g_w = candidate_grads(WEIGHTS(v, ok, a, b, c, prm_ptr), v, r, lam)
            if SPLIT:
                v, ok, r = mix_candidates(s_p, s_a, lab_p, lab_n, offs_n, B, pm_r, sap_r, lam)
                g_anc_r, g_pos, g_w_r = candidate_grads(WEIGHTS(v, ok, ap, bp, cp, prm_ptr), v,
                                                        r, lam)
                gw += g_w + tl.trans(g_w_r)
            else:
                gw += g_w
            acc = add_tile_product(acc, g_anc + g_pos, x_ptr, offs_n, B, D, stride_x,
                                   BLOCK_DO, PRECISION)
        if SPLIT:  # gw[i, j] (i in R, j in P) pairs x_i with x_j
            return add_tile_product(acc, gw, x_ptr, offs_p, p1, D, stride_x, BLOCK_DO,
                                    PRECISION)
        return add_tile_product(acc, gw + tl.trans(gw), x_ptr, offs_k, a1, D, stride_x,
                                BLOCK_DO, PRECISION)

    @triton.jit
    def mix_grad_rows_kernel(x_ptr, lab_ptr, cnt_ptr, chunk_ptr, prm_ptr, a_ptr, b_ptr, c_ptr,
                             dx_ptr, B, D, stride_x, stride_dx, WEIGHTS: tl.constexpr,
                             ANCHOR_NEG: tl.constexpr, SPLIT: tl.constexpr, KB: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_DO: tl.constexpr, ACC: tl.constexpr,
                             PRECISION: tl.constexpr):
        """dX of a chunk's rows R: (∂L/∂S tile) · X_N over the column tiles, plus the
        anchor–positive entries. Without SPLIT one candidate tile per column tile holds R both
        as anchors and as positives. With SPLIT, per block P of R's class, the tile of anchors
        R with positives P gives R's anchor entries and the tile of anchors P with positives R
        its positive entries (P = R included: the two tiles are then one tile's two parts).
        (Without SPLIT there is no loop over blocks: on sm_90 the loop alone raised the
        spills of this kernel at KB = 16 from 32 to 204 bytes.)"""
        c_id = tl.program_id(0)
        offs_k, a1, lab_k, cnt_k, p0, p1 = chunk_rows(chunk_ptr, c_id, lab_ptr, cnt_ptr, KB)
        a0 = tl.load(chunk_ptr + 4 * c_id)
        row_ok = offs_k < a1
        a, b, c = _chunk_vecs(a_ptr, b_ptr, c_ptr, offs_k, row_ok, ACC)
        lam = tl.load(prm_ptr)
        acc = tl.zeros((KB, BLOCK_DO), dtype=ACC)
        if SPLIT:
            for p in range(p0, p1, KB):
                acc = _rows_against_block(acc, x_ptr, lab_ptr, cnt_ptr, prm_ptr, a_ptr, b_ptr,
                                          c_ptr, offs_k, a0, a1, lab_k, cnt_k, a, b, c, lam, p,
                                          p1, B, D, stride_x, WEIGHTS, ANCHOR_NEG, SPLIT, KB,
                                          BLOCK_N, BLOCK_D, BLOCK_DO, ACC, PRECISION)
        else:  # the positives are the chunk's own rows
            acc = _rows_against_block(acc, x_ptr, lab_ptr, cnt_ptr, prm_ptr, a_ptr, b_ptr,
                                      c_ptr, offs_k, a0, a1, lab_k, cnt_k, a, b, c, lam, a0, a1,
                                      B, D, stride_x, WEIGHTS, ANCHOR_NEG, SPLIT, KB, BLOCK_N,
                                      BLOCK_D, BLOCK_DO, ACC, PRECISION)
        offs_d = tl.arange(0, BLOCK_DO)
        tl.store(dx_ptr + offs_k[:, None] * stride_dx + offs_d[None, :], acc,
                 mask=row_ok[:, None] & (offs_d[None, :] < D))

    @triton.jit
    def mix_grad_cols_kernel(x_ptr, lab_ptr, cnt_ptr, chunk_ptr, prm_ptr, a_ptr, b_ptr, c_ptr,
                             dx_ptr, n_chunks, B, D, stride_x, stride_dx,
                             WEIGHTS: tl.constexpr, ANCHOR_NEG: tl.constexpr,
                             SPLIT: tl.constexpr, KB: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, ACC: tl.constexpr,
                             PRECISION: tl.constexpr):
        """dX of BLOCK_N columns: Σ over the chunks and their positive blocks of the ∂L/∂S
        tiles' transposes times the anchors' and the positives' rows."""
        n0 = tl.program_id(0) * BLOCK_N
        lam = tl.load(prm_ptr)
        acc = tl.zeros((BLOCK_N, BLOCK_DO), dtype=ACC)
        for ci in range(0, n_chunks):
            offs_k, a1, lab_k, cnt_k, p0, p1 = chunk_rows(chunk_ptr, ci, lab_ptr, cnt_ptr, KB)
            a, b, c = _chunk_vecs(a_ptr, b_ptr, c_ptr, offs_k, offs_k < a1, ACC)
            for p in range(p0, p1, KB):
                offs_p, lab_p, pm, sap = pos_block(x_ptr, lab_ptr, offs_k, a1, lab_k, cnt_k, p, p1,
                                               D, stride_x, ANCHOR_NEG, KB, BLOCK_D, ACC,
                                               PRECISION)
                v, ok, r, offs_n, s_a, s_p, lab_n = candidate_tile(
                    x_ptr, lab_ptr, offs_k, a1, lab_k, offs_p, p1, pm, sap, n0, B, D, stride_x,
                    lam, SPLIT, KB, BLOCK_N, BLOCK_D, ACC, PRECISION)
                g_anc, g_pos, g_w = candidate_grads(WEIGHTS(v, ok, a, b, c, prm_ptr), v, r, lam)
                if SPLIT:
                    acc = add_tile_product(acc, tl.trans(g_anc), x_ptr, offs_k, a1, D,
                                           stride_x, BLOCK_DO, PRECISION)
                    acc = add_tile_product(acc, tl.trans(g_pos), x_ptr, offs_p, p1, D,
                                           stride_x, BLOCK_DO, PRECISION)
                else:
                    acc = add_tile_product(acc, tl.trans(g_anc + g_pos), x_ptr, offs_k, a1, D,
                                           stride_x, BLOCK_DO, PRECISION)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_DO)
        tl.store(dx_ptr + offs_n[:, None] * stride_dx + offs_d[None, :], acc,
                 mask=(offs_n[:, None] < B) & (offs_d[None, :] < D))


def mix_config(x, kb, grad: bool = False):
    """Launch settings: the chunk height KB, and columns per tile so that the KB×KB×BLOCK_N
    candidate tensor stays at about 8K entries (16 columns at least, for tl.dot). On a GPU
    the gradient kernels take half that: compiled for sm_90 at D = 512 (8 warps, ptxas -v,
    benchmarks/triton_spills.py), KB = 16 with 32 columns spills 124–216 bytes in the
    gradient kernels and none in the forward; with 16 columns 16–32 bytes."""
    cfg, block_do, warps = launch_config(x, x, grad=True)
    cfg = dict(cfg)
    cfg.pop("BLOCK_M")
    entries = 4096 if grad and x.device.type == "cuda" else 8192
    cfg["BLOCK_N"] = max(16, min(cfg["BLOCK_N"], entries // (kb * kb)))
    return cfg, block_do, warps


def chunk_launch(x, labels, anchor_neg, grad: bool = False):
    """(the chunk table, the rows' class sizes, the number of chunks, the kernels' shared
    meta-parameters, BLOCK_DO) of the label-sorted batch (chunk_table, mix_config); the
    gradient ops (grad) take the table their forward built (table_cache)."""
    table, kb, counts, split = table_cache.handed(
        (labels,), ("metrix", bool(anchor_neg)), lambda: chunk_table(labels, anchor_neg), grad)
    cfg, block_do, warps = mix_config(x, kb, grad)
    meta = dict(ANCHOR_NEG=bool(anchor_neg), SPLIT=split, KB=kb, **cfg, **warps)
    return table, counts, len(table) // 4, meta, block_do


def mix_grads(weights, x, labels, prm, vecs, anchor_neg):
    """dX of a Metrix term over the label-sorted batch from the per-candidate weights
    `weights` (a @triton.jit function of the three per-anchor vectors `vecs` and the constants
    `prm`, a tensor of x's dtype whose entry 0 is λ): the chunk rows' part and the column
    owners' part, summed."""
    b, d = x.shape
    if b == 0:
        return torch.zeros_like(x)
    table, counts, n_chunks, meta, block_do = chunk_launch(x, labels, anchor_neg, grad=True)
    args = (x, labels, counts, table, prm, *(v.to(x.dtype).contiguous() for v in vecs))
    meta = dict(meta, WEIGHTS=weights, BLOCK_DO=block_do)
    dx_rows, dx_cols = torch.empty_like(x), torch.empty_like(x)
    mix_grad_rows_kernel[(n_chunks,)](*args, dx_rows, b, d, x.stride(0),
                                      dx_rows.stride(0), **meta)
    mix_grad_cols_kernel[(triton.cdiv(b, meta["BLOCK_N"]),)](
        *args, dx_cols, n_chunks, b, d, x.stride(0), dx_cols.stride(0), **meta)
    return dx_rows + dx_cols
