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

The backward kernels are shared (mix_grads): a loss supplies its candidate weight as a
@triton.jit function WEIGHTS(v, ok, a, b, c, prm_ptr) of three per-anchor vectors (its
upstream gradients and saved row statistics) and its constants, as the clean pair losses
supply their G tile to pairs.py.

Classes are at most 64 rows (KB ≤ 64: the candidate tensor is KB²·BLOCK_N); a batch with a
larger class is not covered (the driver takes the next engine). The chunk table is built
inside the ops (chunk_table), so the modules trace under torch.compile; there the class
sizes cannot be read before the op, "auto" tries the CUDA engine first (backend.py,
VALUE_DEPENDENT), and a larger class reaching the op raises an error naming the fix."""
from __future__ import annotations

import torch

from .launch import HAS_TRITON, next_pow2
from .pairs import launch_config

MAX_CLASS = 64
MIX_EPS = 1e-12  # as F.normalize and the CPU kernels (common/metrix_mix.h kMixEps)


def chunk_table(sorted_labels: torch.Tensor):
    """(chunk starts with the end appended, as int32 on the labels' device; KB; each row's
    class size, int32, for the rule "no positive: mix the anchor itself"): whole classes of
    the sorted labels packed greedily into chunks of at most KB rows, KB the smallest power of
    two ≥ 16 (tl.dot's least) that holds the largest class.

    Built inside the ops (eager there, so the table may depend on the labels' values and the
    modules trace under torch.compile(fullgraph=True)). A class over MAX_CLASS rows raises:
    covers() sends such a batch to the next engine eagerly, but under compile it cannot read
    the labels and lets every batch through."""
    _, inverse, sizes = torch.unique_consecutive(sorted_labels, return_inverse=True,
                                                 return_counts=True)
    counts = sizes.tolist()
    biggest = max(counts, default=1)
    if biggest > MAX_CLASS:
        raise ValueError(
            f"labels: the Triton engine's Metrix and EE kernels take classes of at most "
            f"{MAX_CLASS} rows, and this batch has a larger class. Outside torch.compile such a "
            "batch goes to the next engine; under it the engine is chosen without the labels' "
            "values: use backend='cuda' or 'cpu' for such batches, or call the loss outside "
            "the compiled region")
    kb = max(16, next_pow2(biggest))
    starts, row = [0], 0
    for c in counts:
        if row + c - starts[-1] > kb:  # the class does not fit: it opens the next chunk
            starts.append(row)
        row += c
    starts.append(row)
    return (torch.tensor(starts, dtype=torch.int32, device=sorted_labels.device), kb,
            sizes[inverse].to(torch.int32))


def check_segment_labels(labels, seg_i, seg_j) -> None:
    """EE's segments are positive pairs: both ends rows of the batch with one label. Checked in
    the ops (eagerly, whatever n), where a compiled module cannot check them before the op
    (pairs="adjacent" on a batch that is not class-contiguous), as the CPU ops check them."""
    if len(seg_i) == 0:
        return
    b = len(labels)
    ends = torch.cat([seg_i, seg_j])
    if int(ends.min()) < 0 or int(ends.max()) >= b:
        raise ValueError(f"seg_i and seg_j must be rows of the batch, in [0, {b})")
    bad = torch.nonzero(labels[seg_i] != labels[seg_j])
    if len(bad):
        e = int(bad[0, 0])
        raise ValueError(f"Embedding Expansion's segment ({int(seg_i[e])}, {int(seg_j[e])}) joins "
                         "rows of different labels: segments are positive pairs (with "
                         "pairs='adjacent', rows 2t and 2t+1 of a class-contiguous batch)")


def run_sorted(op, x_unit, labels, pairs: str, *consts):
    """op(xs, ys, *consts, anchor_neg) on the label-sorted batch (the op builds its chunk
    table: chunk_table), its per-anchor outputs back in the caller's order."""
    from ..ops.ms_metrix import label_sorted
    if pairs not in ("pos_neg", "anchor_neg"):
        raise ValueError(f"pairs must be 'pos_neg' or 'anchor_neg', got {pairs!r}")
    xs, ys, inverse = label_sorted(x_unit, labels)
    out = op(xs, ys, *consts, pairs == "anchor_neg")
    return tuple(t.index_select(0, inverse) for t in out)


def largest_class_fits(labels) -> bool:
    """Every class has at most MAX_CLASS rows; True under torch.compile, which cannot look
    (the ops raise there: chunk_table)."""
    if len(labels) == 0 or torch.compiler.is_compiling():
        return True
    return int(torch.unique(labels, return_counts=True)[1].max()) <= MAX_CLASS


def covers(clean_supports, params, inp, expansion, metrix) -> bool:
    """A Metrix loss of this engine covers the call: its clean loss does, embedding level,
    pos_neg or anchor_neg, the batch against itself, classes of at most MAX_CLASS rows."""
    from ..fused.multi_similarity import self_pairs
    if not (clean_supports(params, inp, expansion) and metrix.level == "embedding"
            and metrix.pairs in ("pos_neg", "anchor_neg") and self_pairs(inp)):
        return False
    return largest_class_fits(inp.labels)


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

    torch.library.register_autograd(fwd_name, backward, setup_context=setup)


if HAS_TRITON:
    import triton
    import triton.language as tl

    from .tiles import add_tile_product, sim_tile

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
    def fold3(m, t, x):
        """An online log-sum-exp per anchor (running max m, Σ e^{·−m}) folding a KB×KB×N
        tile x; a state started at (−inf, 0) stays so until a finite term comes."""
        m_new = tl.maximum(m, tl.max(tl.max(x, axis=2), axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        e = tl.exp(x - m_safe[:, None, None])
        return m_new, t * tl.exp(m - m_safe) + tl.sum(tl.sum(e, axis=2), axis=1)

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

    @triton.jit
    def _chunk_vecs(a_ptr, b_ptr, c_ptr, offs_k, row_ok, ACC: tl.constexpr):
        a = tl.load(a_ptr + offs_k, mask=row_ok, other=0.0).to(ACC)
        b = tl.load(b_ptr + offs_k, mask=row_ok, other=0.0).to(ACC)
        c = tl.load(c_ptr + offs_k, mask=row_ok, other=0.0).to(ACC)
        return a, b, c

    @triton.jit
    def mix_grad_rows_kernel(x_ptr, lab_ptr, cnt_ptr, chunk_ptr, prm_ptr, a_ptr, b_ptr, c_ptr,
                             dx_ptr, B, D, stride_x, stride_dx, WEIGHTS: tl.constexpr,
                             ANCHOR_NEG: tl.constexpr, KB: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, ACC: tl.constexpr,
                             PRECISION: tl.constexpr):
        """dX of a chunk's rows: (∂L/∂S tile) · X_N over the column tiles, plus the
        within-class entries (G_ij + G_ji) x_j."""
        offs_k, c1, lab_k, pm, sap = chunk_rows(chunk_ptr, tl.program_id(0), lab_ptr, cnt_ptr,
                                                x_ptr, D, stride_x, ANCHOR_NEG, KB, BLOCK_D, ACC,
                                                PRECISION)
        row_ok = offs_k < c1
        a, b, c = _chunk_vecs(a_ptr, b_ptr, c_ptr, offs_k, row_ok, ACC)
        lam = tl.load(prm_ptr)
        acc = tl.zeros((KB, BLOCK_DO), dtype=ACC)
        gw = tl.zeros((KB, KB), dtype=ACC)
        for n0 in range(0, B, BLOCK_N):
            v, ok, r, offs_n = candidate_tile(x_ptr, lab_ptr, offs_k, c1, lab_k, pm, sap, n0, B,
                                              D, stride_x, lam, KB, BLOCK_N, BLOCK_D, ACC,
                                              PRECISION)
            gt, gwt = candidate_grads(WEIGHTS(v, ok, a, b, c, prm_ptr), v, r, lam)
            gw += gwt
            acc = add_tile_product(acc, gt, x_ptr, offs_n, B, D, stride_x, BLOCK_DO, PRECISION)
        acc = add_tile_product(acc, gw + tl.trans(gw), x_ptr, offs_k, c1, D, stride_x, BLOCK_DO,
                               PRECISION)
        offs_d = tl.arange(0, BLOCK_DO)
        tl.store(dx_ptr + offs_k[:, None] * stride_dx + offs_d[None, :], acc,
                 mask=row_ok[:, None] & (offs_d[None, :] < D))

    @triton.jit
    def mix_grad_cols_kernel(x_ptr, lab_ptr, cnt_ptr, chunk_ptr, prm_ptr, a_ptr, b_ptr, c_ptr,
                             dx_ptr, n_chunks, B, D, stride_x, stride_dx,
                             WEIGHTS: tl.constexpr, ANCHOR_NEG: tl.constexpr, KB: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_DO: tl.constexpr, ACC: tl.constexpr,
                             PRECISION: tl.constexpr):
        """dX of BLOCK_N columns: Σ over the chunks of (∂L/∂S tile)ᵀ · X_chunk."""
        n0 = tl.program_id(0) * BLOCK_N
        lam = tl.load(prm_ptr)
        acc = tl.zeros((BLOCK_N, BLOCK_DO), dtype=ACC)
        for ci in range(0, n_chunks):
            offs_k, c1, lab_k, pm, sap = chunk_rows(chunk_ptr, ci, lab_ptr, cnt_ptr, x_ptr, D,
                                                    stride_x, ANCHOR_NEG, KB, BLOCK_D, ACC,
                                                    PRECISION)
            a, b, c = _chunk_vecs(a_ptr, b_ptr, c_ptr, offs_k, offs_k < c1, ACC)
            v, ok, r, _ = candidate_tile(x_ptr, lab_ptr, offs_k, c1, lab_k, pm, sap, n0, B, D,
                                         stride_x, lam, KB, BLOCK_N, BLOCK_D, ACC, PRECISION)
            gt, _ = candidate_grads(WEIGHTS(v, ok, a, b, c, prm_ptr), v, r, lam)
            acc = add_tile_product(acc, tl.trans(gt), x_ptr, offs_k, c1, D, stride_x, BLOCK_DO,
                                   PRECISION)
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


def mix_grads(weights, x, labels, prm, vecs, anchor_neg):
    """dX of a Metrix term over the label-sorted batch from the per-candidate weights
    `weights` (a @triton.jit function of the three per-anchor vectors `vecs` and the constants
    `prm`, a tensor of x's dtype whose entry 0 is λ): the chunk rows' part and the column
    owners' part, summed."""
    b, d = x.shape
    if b == 0:
        return torch.zeros_like(x)
    chunks, kb, counts = chunk_table(labels)
    cfg, block_do, warps = mix_config(x, kb, grad=True)
    args = (x, labels, counts, chunks, prm, *(v.to(x.dtype).contiguous() for v in vecs))
    meta = dict(WEIGHTS=weights, ANCHOR_NEG=bool(anchor_neg), KB=kb, BLOCK_DO=block_do, **cfg,
                **warps)
    dx_rows, dx_cols = torch.empty_like(x), torch.empty_like(x)
    n_chunks = len(chunks) - 1
    mix_grad_rows_kernel[(n_chunks,)](*args, dx_rows, b, d, x.stride(0),
                                      dx_rows.stride(0), **meta)
    mix_grad_cols_kernel[(triton.cdiv(b, cfg["BLOCK_N"]),)](
        *args, dx_cols, n_chunks, b, d, x.stride(0), dx_cols.stride(0), **meta)
    return dx_rows + dx_cols
