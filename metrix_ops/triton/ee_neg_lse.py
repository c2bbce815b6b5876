"""The negative side of the Embedding Expansion losses that score every (anchor, negative
point) pair (MultiSimilarity, LiftedStructure, GeneralizedLiftedStructure, NPairs) on the
Triton engine: per original anchor i

    lse_i = log Σ_{q ∈ Q_i} exp(scale · m̂(i, q) + offset),
    m̂(i, q) = ŝ(i, q) = max_{a ∈ A_i} s(a, q)   (cosine), or √(2 − 2ŝ) (L2, cdist's 0),

the same op as the CPU engine's ee_neg_lse (csrc/cpu/ee_losses_cpu.cpp), so the losses share
its glue (fused/ee_losses.py). A_i: x_i, then the points of i's segments in the reference's
order (ties to the earliest); Q_i: originals of another class allowed by neg_mask, and every
synthetic point of another class.

Layout: the batch label-sorted and cut into chunks of at most KB rows that no segment crosses
(ee_chunks.unit_chunks: whole classes with pairs="all", pairs of rows with "adjacent"), so an
anchor's side points have both endpoints among its chunk's rows. Points are index triples (u, w, λ), never materialised, listed chunk by chunk (each
chunk's originals, then its segments' points). A program takes one chunk:
- against a tile of BQ points, two tl.dots give G_u = X_c X[q_u]ᵀ and G_w = X_c X[q_w]ᵀ, and
  H = λ_q G_u + (1−λ_q) G_w (KB × BQ, ⟨x_r, q⟩ for the chunk's rows r);
- each anchor's side points are a selection matrix (BA × KB: λ_a at u_a, 1−λ_a at w_a), so
  one more tl.dot gives their inner products with the tile, / (‖a‖‖q‖), and ŝ is a max
  over them (the earliest side point on ties, as the reference).
Forward: an online log-sum-exp per anchor, no atomics. Backward (recomputing ŝ and its
argmax, as the CPU op does, instead of a B×P table): the winning side point's weight goes
back through the selection matrix to ∂L/∂H, then to the Gram entries. A program writes only
its own chunk's rows: first as the anchor side (its anchors against every point), then as the
point side (every chunk's anchors against its own points), so the gradient has one writer
per row and no atomics; the side points' and points' norms get their gradient in per-entry
buffers, and the norms (computed in PyTorch from per-segment Gram entries) carry it to X.

Work: forward one pass, backward two, each (chunk, point tile) a few KB-sized products;
memory O(B·D + n·#segments) beside X. With pairs="all", classes of at most 64 rows (else not
covered; the tables are built inside the ops, as ee_chunks.unit_chunks says); with
"adjacent", any class."""
from __future__ import annotations

import torch

from ..ops.autograd import call, register_autograd
from .launch import HAS_TRITON, next_pow2, triton_op, usable_on
from . import table_cache
from .ee_chunks import largest_unit_fits, unit_chunks
from .segment_norms import segment_norms_triton
from .tiles import acc_dtype, dot_precision

_FWD = "metrix_ops::triton_ee_neg_lse_fwd"
_BWD = "metrix_ops::triton_ee_neg_lse_bwd"

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .tiles import add_tile_product, sim_tile

    @triton.jit
    def _tile_h(x_ptr, offs_k, r1, qu, qw, ql, B, D, stride_x, KB: tl.constexpr,
                BQ: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
                PRECISION: tl.constexpr):
        """H[r, q] = λ_q ⟨x_r, x_{q_u}⟩ + (1−λ_q) ⟨x_r, x_{q_w}⟩ for the chunk rows offs_k."""
        gu = sim_tile(x_ptr, x_ptr, offs_k, qu, r1, B, D, stride_x, stride_x, KB, BQ, BLOCK_D,
                      ACC, PRECISION)
        gw = sim_tile(x_ptr, x_ptr, offs_k, qw, r1, B, D, stride_x, stride_x, KB, BQ, BLOCK_D,
                      ACC, PRECISION)
        return ql[None, :] * gu + (1 - ql[None, :]) * gw

    @triton.jit
    def _side_block(r0, b0, s_hi, su_ptr, sw_ptr, sl_ptr, sp_ptr, pn_ptr, KB: tl.constexpr,
                    BA: tl.constexpr, ACC: tl.constexpr):
        """Side entries [b0, b0 + BA) (< s_hi): their selection matrix (BA × KB, λ at the
        local row of u, 1−λ at w; an original is 1 at its own row), norms, indices, mask."""
        offs_s = b0 + tl.arange(0, BA)
        s_ok = offs_s < s_hi
        su = tl.load(su_ptr + offs_s, mask=s_ok, other=0) - r0
        sw = tl.load(sw_ptr + offs_s, mask=s_ok, other=0) - r0
        sl = tl.load(sl_ptr + offs_s, mask=s_ok, other=0.0).to(ACC)
        sp = tl.load(sp_ptr + offs_s, mask=s_ok, other=-1)
        sn = tl.load(pn_ptr + sp, mask=s_ok & (sp >= 0), other=1.0).to(ACC)
        cols = tl.arange(0, KB)
        sel = (tl.where(cols[None, :] == su[:, None], sl[:, None], 0.0)
               + tl.where(cols[None, :] == sw[:, None], 1 - sl[:, None], 0.0))
        sel = tl.where(s_ok[:, None], sel, 0.0).to(ACC)
        return sel, sn, offs_s, s_ok

    @triton.jit
    def _anchor_best(h, qn, r0, s_lo, s_hi, su_ptr, sw_ptr, sl_ptr, sp_ptr, pn_ptr,
                     KB: tl.constexpr, BQ: tl.constexpr, BA: tl.constexpr, ACC: tl.constexpr):
        """(ŝ, winning side entry) per point of the tile for the anchor whose side entries are
        [s_lo, s_hi): the max over them, the earliest on ties (strict improvement)."""
        best = tl.full((BQ,), float("-inf"), ACC)
        barg = tl.full((BQ,), -1, tl.int32)
        for b0 in range(s_lo, s_hi, BA):
            sel, sn, offs_s, s_ok = _side_block(r0, b0, s_hi, su_ptr, sw_ptr, sl_ptr, sp_ptr,
                                                pn_ptr, KB, BA, ACC)
            v = tl.dot(sel, h, input_precision="ieee", out_dtype=ACC) / (sn[:, None] * qn[None, :])
            v = tl.where(s_ok[:, None], v, float("-inf"))
            bm = tl.max(v, axis=0)
            bi = tl.min(tl.where(v == bm[None, :], offs_s[:, None], 2147483647), axis=0)
            win = bm > best
            best = tl.where(win, bm, best)
            barg = tl.where(win, bi, barg)
        return best, barg

    @triton.jit
    def _metric(s, L2: tl.constexpr, tiny, eps):
        """The loss metric of a cosine: itself, or the reference's safe_sqrt(2 − 2s)."""
        if L2:
            d2 = 2.0 - 2.0 * s
            return tl.where(d2 < tiny, 0.0, tl.sqrt(tl.maximum(d2, eps)))
        return s

    @triton.jit
    def _triplet_tile(best, term, i, j0, pos_ptr, pst_ptr, pct_ptr, margin, L2: tl.constexpr,
                      KP: tl.constexpr, ACC: tl.constexpr, tiny, eps):
        """TripletMarginLoss "all" (MODE 1): v = margin(pos_ip, m̂(i, q)) + margin over the
        block [j0, j0 + KP) of anchor i's positives (their clean metric, pos[pst_i + j],
        j < pct_i) × the tile's points (KP × BQ), with where (p, q) is a triplet, and those
        positives' slots. The callers loop over the blocks, so a class of any size fits."""
        m = _metric(best, L2, tiny, eps)
        offs_p = j0 + tl.arange(0, KP)
        p0 = tl.load(pst_ptr + i)
        p_ok = offs_p < tl.load(pct_ptr + i)
        pv = tl.load(pos_ptr + p0 + offs_p, mask=p_ok, other=0.0).to(ACC)
        if L2:
            v = pv[:, None] - m[None, :] + margin
        else:
            v = m[None, :] - pv[:, None] + margin
        return v, p_ok[:, None] & term[None, :], p0 + offs_p, p_ok

    @triton.jit
    def _hinge(v, SMOOTH: tl.constexpr):
        """relu, or F.softplus (linear past 20), as the CPU op's ee_trip_f."""
        if SMOOTH:
            # log1p(e) as log(u)·e/(u − 1), u = 1 + e (Kahan): exact where 1 + e rounds,
            # which log(1 + e) is not (fp32 loses terms below v ≈ −16)
            e = tl.exp(tl.minimum(v, 20.0))
            u = 1.0 + e
            d = tl.where(u == 1.0, 1.0, u - 1.0)
            r = tl.where(v > 20.0, v, tl.where(u == 1.0, e, tl.log(u) * (e / d)))
        else:
            r = tl.maximum(v, 0.0)
        return r.to(v.dtype)

    @triton.jit
    def _dhinge(v, SMOOTH: tl.constexpr):
        if SMOOTH:
            r = tl.where(v > 20.0, 1.0, 1.0 / (1.0 + tl.exp(-tl.minimum(v, 20.0))))
        else:
            r = tl.where(v > 0.0, 1.0, 0.0)
        return r.to(v.dtype)

    @triton.jit
    def _load_points(offs_q, q_ok, pu_ptr, pw_ptr, pl_ptr, pp_ptr, pok_ptr, pn_ptr, cls_ptr,
                     ACC: tl.constexpr):
        qu = tl.load(pu_ptr + offs_q, mask=q_ok, other=0)
        qw = tl.load(pw_ptr + offs_q, mask=q_ok, other=0)
        ql = tl.load(pl_ptr + offs_q, mask=q_ok, other=1.0).to(ACC)
        qp = tl.load(pp_ptr + offs_q, mask=q_ok, other=-1)
        qn = tl.load(pn_ptr + qp, mask=q_ok & (qp >= 0), other=1.0).to(ACC)
        qok = tl.load(pok_ptr + offs_q, mask=q_ok, other=0) != 0
        qc = tl.load(cls_ptr + qu, mask=q_ok, other=-1)
        return qu, qw, ql, qp, qn, qok & q_ok, qc

    @triton.jit
    def _fwd_kernel(x_ptr, pn_ptr, chunk_ptr, cls_ptr, amask_ptr, pstart_ptr, pu_ptr, pw_ptr,
                    pl_ptr, pp_ptr, pok_ptr, soff_ptr, su_ptr, sw_ptr, sl_ptr, sp_ptr, prm_ptr,
                    out_ptr, pos_ptr, pst_ptr, pct_ptr, nz_ptr, ct_ptr, B, D, stride_x, n_chunks,
                    L2: tl.constexpr, KB: tl.constexpr, BQ: tl.constexpr, BA: tl.constexpr,
                    BLOCK_D: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                    MODE: tl.constexpr = 0, SMOOTH: tl.constexpr = False, KP: tl.constexpr = 16):
        """MODE 0: the log-sum-exp per anchor into out. MODE 1 (TripletMarginLoss "all"): per
        anchor Σ f(v) into out, #f > 0 into nz and #triplets into ct (prm[4]: the margin)."""
        c = tl.program_id(0)
        r0 = tl.load(chunk_ptr + c)
        r1 = tl.load(chunk_ptr + c + 1)
        lanes = tl.arange(0, KB)
        offs_k = r0 + lanes
        scale, offset = tl.load(prm_ptr), tl.load(prm_ptr + 1)
        tiny, eps = tl.load(prm_ptr + 2), tl.load(prm_ptr + 3)
        margin = tl.load(prm_ptr + 4)
        if MODE == 0:
            m_run = tl.full((KB,), float("-inf"), ACC)
        else:
            m_run = tl.zeros((KB,), ACC)  # the triplet sums
        s_run = tl.zeros((KB,), ACC)
        nz_run = tl.zeros((KB,), tl.int64)
        ct_run = tl.zeros((KB,), tl.int64)
        n_pts = tl.load(pstart_ptr + n_chunks)
        for q0 in range(0, n_pts, BQ):
            offs_q = q0 + tl.arange(0, BQ)
            qu, qw, ql, qp, qn, qok, qc = _load_points(offs_q, offs_q < n_pts, pu_ptr, pw_ptr,
                                                       pl_ptr, pp_ptr, pok_ptr, pn_ptr, cls_ptr,
                                                       ACC)
            h = _tile_h(x_ptr, offs_k, r1, qu, qw, ql, B, D, stride_x, KB, BQ, BLOCK_D, ACC,
                        PRECISION)
            for a in range(0, r1 - r0):
                i = r0 + a
                if tl.load(amask_ptr + i) != 0:
                    best, barg = _anchor_best(h, qn, r0, tl.load(soff_ptr + i),
                                              tl.load(soff_ptr + i + 1), su_ptr, sw_ptr, sl_ptr,
                                              sp_ptr, pn_ptr, KB, BQ, BA, ACC)
                    term = qok & (qc != tl.load(cls_ptr + i)) & (barg >= 0)
                    lane = lanes == a
                    if MODE == 0:
                        v = tl.where(term, scale * _metric(best, L2, tiny, eps) + offset,
                                     float("-inf"))
                        mi = tl.max(tl.where(lane, m_run, float("-inf")), axis=0)
                        si = tl.sum(tl.where(lane, s_run, 0.0), axis=0)
                        mn = tl.maximum(mi, tl.max(v, axis=0))
                        safe = tl.where(mn == float("-inf"), 0.0, mn)
                        sn = si * tl.exp(mi - safe) + tl.sum(tl.exp(v - safe), axis=0)
                        m_run = tl.where(lane, mn, m_run)
                        s_run = tl.where(lane, sn, s_run)
                    else:
                        for j0 in range(0, tl.load(pct_ptr + i), KP):
                            v, ok, _, _ = _triplet_tile(best, term, i, j0, pos_ptr, pst_ptr,
                                                        pct_ptr, margin, L2, KP, ACC, tiny, eps)
                            f = tl.where(ok, _hinge(v, SMOOTH), 0.0)
                            m_run += tl.where(lane, tl.sum(tl.sum(f, axis=1), axis=0), 0.0)
                            nz = tl.sum(tl.sum((ok & (f > 0)).to(tl.int64), axis=1), axis=0)
                            ct = tl.sum(tl.sum(ok.to(tl.int64), axis=1), axis=0)
                            nz_run += tl.where(lane, nz, 0)
                            ct_run += tl.where(lane, ct, 0)
        if MODE == 0:
            out = tl.where(s_run > 0, m_run + tl.log(tl.where(s_run > 0, s_run, 1.0)),
                           float("-inf"))
            tl.store(out_ptr + offs_k, out, mask=offs_k < r1)
        else:
            tl.store(out_ptr + offs_k, m_run, mask=offs_k < r1)
            tl.store(nz_ptr + offs_k, nz_run, mask=offs_k < r1)
            tl.store(ct_ptr + offs_k, ct_run, mask=offs_k < r1)

    @triton.jit
    def _anchors_dh(h, qn, qok, qc, a0, a1, g_ptr, lse_ptr, amask_ptr, cls_ptr, soff_ptr,
                    su_ptr, sw_ptr, sl_ptr, sp_ptr, pn_ptr, dside_ptr, scale, offset, tiny, eps,
                    pos_ptr, pst_ptr, pct_ptr, dpos_ptr, margin, L2: tl.constexpr,
                    DSIDE: tl.constexpr, KB: tl.constexpr, BQ: tl.constexpr, BA: tl.constexpr,
                    ACC: tl.constexpr, MODE: tl.constexpr, SMOOTH: tl.constexpr,
                    KP: tl.constexpr):
        """∂L/∂H (KB × BQ) of the anchors of the chunk [a0, a1) against a point tile, and the
        points' ∂L/∂‖q‖; with DSIDE, the winning side entries' ∂L/∂‖a‖ added to dside (each
        side entry belongs to one anchor, hence to one program), and in MODE 1 the anchors'
        ∂L/∂pos (likewise theirs alone)."""
        dh = tl.zeros((KB, BQ), ACC)
        dqn = tl.zeros((BQ,), ACC)
        rows = tl.arange(0, KB)
        for a in range(0, a1 - a0):
            i = a0 + a
            g = tl.load(g_ptr + i).to(ACC)
            lse = tl.load(lse_ptr + i).to(ACC)
            if (tl.load(amask_ptr + i) != 0) & (g != 0) & (lse > float("-inf")):
                s_lo, s_hi = tl.load(soff_ptr + i), tl.load(soff_ptr + i + 1)
                best, barg = _anchor_best(h, qn, a0, s_lo, s_hi, su_ptr, sw_ptr, sl_ptr, sp_ptr,
                                          pn_ptr, KB, BQ, BA, ACC)
                term = qok & (qc != tl.load(cls_ptr + i)) & (barg >= 0)
                m = _metric(best, L2, tiny, eps)
                # ∂lse/∂ŝ: the term's softmax weight, times scale and ∂m̂/∂ŝ (1, or −1/d̂)
                if L2:
                    dm = tl.where(m > 0, -1.0 / tl.where(m > 0, m, 1.0), 0.0)
                else:
                    dm = tl.full((BQ,), 1.0, ACC)
                if MODE == 0:
                    wq = tl.where(term, g * tl.exp(scale * m + offset - lse) * scale * dm, 0.0)
                else:
                    # Σ over i's positives of f'(v): +∂v/∂m̂ for a similarity, − for a
                    # distance; the positives' metrics take the opposite sign
                    dfq = tl.zeros((BQ,), ACC)  # Σ over i's positives, block by block
                    for j0 in range(0, tl.load(pct_ptr + i), KP):
                        v, ok, p_at, p_ok = _triplet_tile(best, term, i, j0, pos_ptr, pst_ptr,
                                                          pct_ptr, margin, L2, KP, ACC, tiny,
                                                          eps)
                        df = tl.where(ok, g * _dhinge(v, SMOOTH), 0.0)
                        dfq += tl.sum(df, axis=0)
                        if DSIDE:
                            dp = tl.sum(df, axis=1)
                            if not L2:
                                dp = -dp
                            old_p = tl.load(dpos_ptr + p_at, mask=p_ok, other=0.0)
                            tl.store(dpos_ptr + p_at, old_p + dp, mask=p_ok)
                            tl.debug_barrier()  # as for dside above
                    if L2:
                        wq = tl.where(term, -dfq * dm, 0.0)
                    else:
                        wq = tl.where(term, dfq * dm, 0.0)
                dqn -= wq * tl.where(term, best, 0.0) / qn
                # the winner's endpoints (local rows), weight and norm, gathered per point
                ua = tl.load(su_ptr + barg, mask=term, other=0) - a0
                wa = tl.load(sw_ptr + barg, mask=term, other=0) - a0
                la = tl.load(sl_ptr + barg, mask=term, other=0.0).to(ACC)
                pa = tl.load(sp_ptr + barg, mask=term, other=-1)
                na = tl.load(pn_ptr + pa, mask=term & (pa >= 0), other=1.0).to(ACC)
                wi = wq / (na * qn)
                dh += (tl.where(rows[:, None] == ua[None, :], (la * wi)[None, :], 0.0)
                       + tl.where(rows[:, None] == wa[None, :], ((1 - la) * wi)[None, :], 0.0))
                if DSIDE:
                    # ∂L/∂‖a‖ = −w ŝ/‖a‖ per winning side entry, summed block by block (each
                    # entry belongs to this program's anchor: no other writer, no atomics)
                    ds_q = wq * tl.where(term, best, 0.0) / na
                    for b0 in range(s_lo, s_hi, BA):
                        offs_s = b0 + tl.arange(0, BA)
                        s_ok = offs_s < s_hi
                        win = offs_s[:, None] == barg[None, :]
                        ds = tl.sum(tl.where(win, ds_q[None, :], 0.0), axis=1)
                        old = tl.load(dside_ptr + offs_s, mask=s_ok, other=0.0)
                        tl.store(dside_ptr + offs_s, old - ds, mask=s_ok)
                        # the next read of these entries may be another thread's: make the
                        # store visible across the block first (a CTA barrier)
                        tl.debug_barrier()
        return dh, dqn

    @triton.jit
    def _bwd_kernel(g_ptr, lse_ptr, x_ptr, pn_ptr, chunk_ptr, cls_ptr, amask_ptr, pstart_ptr,
                    pu_ptr, pw_ptr, pl_ptr, pp_ptr, pok_ptr, soff_ptr, su_ptr, sw_ptr, sl_ptr,
                    sp_ptr, prm_ptr, dx_ptr, dside_ptr, dpn_ptr, pos_ptr, pst_ptr, pct_ptr,
                    dpos_ptr, B, D, stride_x, stride_dx, n_chunks, L2: tl.constexpr,
                    KB: tl.constexpr, BQ: tl.constexpr, BA: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_DO: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                    MODE: tl.constexpr = 0, SMOOTH: tl.constexpr = False, KP: tl.constexpr = 16):
        """MODE 0: the log-sum-exp's gradient (lse_ptr: the forward's output). MODE 1: the
        triplet sums' gradient, also into dpos (lse_ptr: zeros)."""
        c = tl.program_id(0)
        r0 = tl.load(chunk_ptr + c)
        r1 = tl.load(chunk_ptr + c + 1)
        lanes = tl.arange(0, KB)
        offs_k = r0 + lanes
        scale, offset = tl.load(prm_ptr), tl.load(prm_ptr + 1)
        tiny, eps = tl.load(prm_ptr + 2), tl.load(prm_ptr + 3)
        margin = tl.load(prm_ptr + 4)
        acc = tl.zeros((KB, BLOCK_DO), ACC)
        # 1) the anchor side: this chunk's anchors against every point; ∂L/∂G[r, q_u or q_w]
        #    times the points' endpoint rows
        n_pts = tl.load(pstart_ptr + n_chunks)
        for q0 in range(0, n_pts, BQ):
            offs_q = q0 + tl.arange(0, BQ)
            qu, qw, ql, qp, qn, qok, qc = _load_points(offs_q, offs_q < n_pts, pu_ptr, pw_ptr,
                                                       pl_ptr, pp_ptr, pok_ptr, pn_ptr, cls_ptr,
                                                       ACC)
            h = _tile_h(x_ptr, offs_k, r1, qu, qw, ql, B, D, stride_x, KB, BQ, BLOCK_D, ACC,
                        PRECISION)
            dh, _ = _anchors_dh(h, qn, qok, qc, r0, r1, g_ptr, lse_ptr, amask_ptr, cls_ptr,
                                soff_ptr, su_ptr, sw_ptr, sl_ptr, sp_ptr, pn_ptr, dside_ptr,
                                scale, offset, tiny, eps, pos_ptr, pst_ptr, pct_ptr, dpos_ptr,
                                margin, L2, True, KB, BQ, BA, ACC, MODE, SMOOTH, KP)
            acc = add_tile_product(acc, dh * ql[None, :], x_ptr, qu, B, D, stride_x, BLOCK_DO,
                                   PRECISION)
            acc = add_tile_product(acc, dh * (1 - ql[None, :]), x_ptr, qw, B, D, stride_x,
                                   BLOCK_DO, PRECISION)
        # 2) the point side: every chunk's anchors against this chunk's points; ∂L/∂G[r, ·]
        #    through the points' selection (λ_q at q_u, 1−λ_q at q_w) times the anchor rows
        p0, p1 = tl.load(pstart_ptr + c), tl.load(pstart_ptr + c + 1)
        for q0 in range(p0, p1, BQ):
            offs_q = q0 + tl.arange(0, BQ)
            q_ok = offs_q < p1
            qu, qw, ql, qp, qn, qok, qc = _load_points(offs_q, q_ok, pu_ptr, pw_ptr, pl_ptr,
                                                       pp_ptr, pok_ptr, pn_ptr, cls_ptr, ACC)
            selq = (tl.where(lanes[None, :] == (qu - r0)[:, None], ql[:, None], 0.0)
                    + tl.where(lanes[None, :] == (qw - r0)[:, None], 1 - ql[:, None], 0.0))
            selq = tl.where(q_ok[:, None], selq, 0.0).to(ACC)  # BQ × KB
            dqn = tl.zeros((BQ,), ACC)
            for c1 in range(0, n_chunks):
                a0 = tl.load(chunk_ptr + c1)
                a1 = tl.load(chunk_ptr + c1 + 1)
                offs_a = a0 + lanes
                h = _tile_h(x_ptr, offs_a, a1, qu, qw, ql, B, D, stride_x, KB, BQ, BLOCK_D, ACC,
                            PRECISION)
                dh, dq = _anchors_dh(h, qn, qok, qc, a0, a1, g_ptr, lse_ptr, amask_ptr, cls_ptr,
                                     soff_ptr, su_ptr, sw_ptr, sl_ptr, sp_ptr, pn_ptr, dside_ptr,
                                     scale, offset, tiny, eps, pos_ptr, pst_ptr, pct_ptr,
                                     dpos_ptr, margin, L2, False, KB, BQ, BA, ACC, MODE, SMOOTH,
                                     KP)
                dqn += dq
                m = tl.dot(tl.trans(selq), tl.trans(dh), input_precision="ieee", out_dtype=ACC)
                acc = add_tile_product(acc, m, x_ptr, offs_a, a1, D, stride_x, BLOCK_DO,
                                       PRECISION)
            tl.store(dpn_ptr + qp, dqn, mask=q_ok & (qp >= 0))
        offs_do = tl.arange(0, BLOCK_DO)
        tl.store(dx_ptr + offs_k[:, None] * stride_dx + offs_do[None, :], acc,
                 mask=(offs_k[:, None] < r1) & (offs_do[None, :] < D))


KP_MAX = 64


def _config(x, kb: int, max_side: int, grad: bool):
    dev, d = x.device, x.shape[1]
    cuda = dev.type == "cuda"
    bq = 16 if (cuda and grad) else 32
    ba = max(16, min(64, next_pow2(max_side)))
    block_d = max(16, min(64 if cuda else 128, next_pow2(d)))
    cfg = dict(KB=kb, BQ=bq, BA=ba, BLOCK_D=block_d, ACC=acc_dtype(x.dtype),
               PRECISION=dot_precision(x.dtype, dev))
    # sm_90 (benchmarks/triton_spills.py): the forward takes 231 registers and no spills on 4
    # warps; the backward's KB × 512 accumulator spills 216 B on 4 warps, none on 8
    warps = dict(num_warps=8 if grad else 4) if cuda else {}
    return cfg, warps


def _params(xs, scale: float, offset: float, margin: float = 0.0):
    eps = torch.finfo(xs.dtype).eps
    return torch.tensor([scale, offset, 16 * eps, eps, margin], dtype=xs.dtype,
                        device=xs.device)


def _trip_cfg(trip, xs):
    """The triplet tables and constexprs of MODE 1 (trip = (pos, pst, pct, smooth)); in MODE 0
    one-entry placeholders that the kernels never read."""
    if trip is None:
        z = xs.new_zeros(1)
        zi = torch.zeros(1, dtype=torch.int32, device=xs.device)
        return (z, zi, zi), {}
    pos, pst, pct, smooth = trip
    # the positives' block: the largest count up to KP_MAX (one block for classes of up to
    # KP_MAX + 1 rows, as before the loop); larger classes take several
    kp = max(16, min(KP_MAX, next_pow2(int(pct.max()) if len(pct) else 1)))
    return (pos, pst, pct), dict(MODE=1, SMOOTH=bool(smooth), KP=kp)


def launch_fwd(xs, pnorm, tables, sizes, l2: bool, prm, out, trip=None, nz=None, ct=None):
    """One forward launch over the chunks; trip (MODE 1): see _trip_cfg, nz and ct its counts."""
    chunks, cls, amask, pstart, pu, pw, pl, pp, pok, soff, su, sw, sl, sp = tables
    b = xs.shape[0]
    kb, max_side = sizes
    cfg, warps = _config(xs, kb, max_side, grad=False)
    (pos, pst, pct), mode = _trip_cfg(trip, xs)
    nz, ct = (pst, pst) if trip is None else (nz, ct)
    _fwd_kernel[(len(chunks) - 1,)](
        xs, pnorm, chunks, cls, amask, pstart, pu, pw, pl, pp, pok, soff, su, sw, sl, sp, prm,
        out, pos, pst, pct, nz, ct, b, xs.shape[1], xs.stride(0), len(chunks) - 1,
        L2=bool(l2), **cfg, **mode, **warps)


def launch_bwd(grad, lse, xs, pnorm, tables, sizes, l2: bool, prm, trip=None, dpos=None):
    """One backward launch: (dx, dpnorm); trip (MODE 1) also fills dpos (lse: zeros)."""
    chunks, cls, amask, pstart, pu, pw, pl, pp, pok, soff, su, sw, sl, sp = tables
    b, d = xs.shape
    dx = torch.zeros_like(xs)
    dside = torch.zeros(len(su), dtype=xs.dtype, device=xs.device)
    dpn = torch.zeros_like(pnorm)
    if b == 0:
        return dx, dpn
    kb, max_side = sizes
    cfg, warps = _config(xs, kb, max_side, grad=True)
    (pos, pst, pct), mode = _trip_cfg(trip, xs)
    dpos = pos if trip is None else dpos
    _bwd_kernel[(len(chunks) - 1,)](
        grad.to(xs.dtype).contiguous(), lse.contiguous(), xs, pnorm, chunks, cls, amask, pstart,
        pu, pw, pl, pp, pok, soff, su, sw, sl, sp, prm, dx, dside, dpn, pos, pst, pct, dpos, b,
        d, xs.stride(0), dx.stride(0), len(chunks) - 1, L2=bool(l2),
        BLOCK_DO=max(16, next_pow2(d)), **cfg, **mode, **warps)
    syn = sp >= 0  # the side entries' norm gradients, onto their points
    dpn.index_add_(0, sp[syn].long(), dside[syn])
    return dx, dpn


@triton_op(_FWD, host_reads=True)
def _fwd_op(xs: torch.Tensor, pnorm: torch.Tensor, layout: list[torch.Tensor], n: int,
            l2: bool, scale: float, offset: float) -> torch.Tensor:
    out = torch.full((xs.shape[0],), float("-inf"), dtype=xs.dtype, device=xs.device)
    if xs.shape[0] > 0:
        tables, sizes = layout_tables(layout, n)
        launch_fwd(xs, pnorm, tables, sizes, l2, _params(xs, scale, offset), out)
    return out


@_fwd_op.register_fake
def _(xs, pnorm, layout, n, l2, scale, offset):
    return xs.new_empty(xs.shape[0])


@triton_op(_BWD, host_reads=True)
def _bwd_op(grad: torch.Tensor, lse: torch.Tensor, xs: torch.Tensor, pnorm: torch.Tensor,
            layout: list[torch.Tensor], n: int, l2: bool, scale: float, offset: float
            ) -> tuple[torch.Tensor, torch.Tensor]:
    if xs.shape[0] == 0:
        return torch.zeros_like(xs), torch.zeros_like(pnorm)
    tables, sizes = layout_tables(layout, n, backward=True)
    return launch_bwd(grad, lse, xs, pnorm, tables, sizes, l2, _params(xs, scale, offset))


@_bwd_op.register_fake
def _(grad, lse, xs, pnorm, layout, n, l2, scale, offset):
    return torch.empty_like(xs), torch.empty_like(pnorm)


def _setup(ctx, inputs, output):
    xs, pnorm, layout, *consts = inputs
    ctx.save_for_backward(output, xs, pnorm, *layout)
    ctx.consts = tuple(consts)


def _backward(ctx, grad):
    lse, xs, pnorm, *layout = ctx.saved_tensors
    dx, dpn = torch.ops.metrix_ops.triton_ee_neg_lse_bwd(grad.contiguous(), lse, xs, pnorm,
                                                         list(layout), *ctx.consts)
    return dx, dpn, [None] * len(layout), None, None, None, None


register_autograd(_FWD, _backward, setup_context=_setup)


def _synthetic(seg_u, seg_w, n: int):
    """Each synthetic point's endpoints and λ (the reference's float64 grid k/(n+1)), segment-
    major, from the segments in sorted positions."""
    s = len(seg_u) if n > 0 else 0
    k = torch.arange(n, device=seg_u.device)
    return (seg_u[:s].repeat_interleave(n), seg_w[:s].repeat_interleave(n),
            ((k + 1).double() / (n + 1)).repeat(s))


def layout_tables(layout, n: int, backward: bool = False):
    """(the chunk, point and side tables of the label-sorted batch, (KB, the most side entries
    of an anchor)) from its layout
    [sorted labels, segments in sorted positions (u, w), anchor mask, negative mask]: see the
    module docstring. Built inside the ops (the chunk table depends on the labels' values,
    which a compiled graph cannot branch on; ee_chunks.unit_chunks raises for a unit over
    EE_MAX_CLASS rows); a backward op takes its forward's (table_cache)."""
    return table_cache.handed(tuple(layout), ("ee", int(n)), lambda: _build_tables(layout, n),
                              backward)


def _build_tables(layout, n: int):
    ys, seg_u, seg_w, amask, nmask = layout
    chunks, kb, most_ends = unit_chunks(ys, seg_u, seg_w)  # (checks the segments too)
    b, dev, i32 = len(ys), ys.device, torch.int32
    n_chunks = len(chunks) - 1
    _, cls = torch.unique_consecutive(ys, return_inverse=True)
    chunk_of = torch.repeat_interleave(torch.arange(n_chunks, device=dev),
                                       (chunks[1:] - chunks[:-1]).long())
    syn_u, syn_w, syn_lam = _synthetic(seg_u, seg_w, n)
    sn = len(syn_u)
    pid = torch.arange(sn, device=dev)
    rows = torch.arange(b, device=dev)
    ones = torch.ones(b, dtype=torch.float64, device=dev)
    # points: per chunk its originals, then its segments' points
    order = torch.argsort(torch.cat([chunk_of * 2, chunk_of[syn_u] * 2 + 1]), stable=True)
    pu = torch.cat([rows, syn_u])[order]
    pw = torch.cat([rows, syn_w])[order]
    pl = torch.cat([ones, syn_lam])[order]
    pp = torch.cat([torch.full_like(rows, -1), pid])[order]
    pok = torch.cat([nmask, torch.ones(sn, dtype=torch.bool, device=dev)])[order]
    per_chunk = torch.bincount(chunk_of[pu], minlength=n_chunks)
    pstart = torch.cat([per_chunk.new_zeros(1), torch.cumsum(per_chunk, 0)])
    # side entries: per anchor itself, then its segments' points as first endpoint, then as
    # second (each in segment order, k ascending): the reference's A_i order
    owner = torch.cat([rows, syn_u, syn_w])
    order = torch.argsort(owner, stable=True)
    sp = torch.cat([torch.full_like(rows, -1), pid, pid])[order]
    su = torch.cat([rows, syn_u, syn_u])[order]
    sw = torch.cat([rows, syn_w, syn_w])[order]
    sl = torch.cat([ones, syn_lam, syn_lam])[order]
    per_anchor = torch.bincount(owner, minlength=b)
    soff = torch.cat([per_anchor.new_zeros(1), torch.cumsum(per_anchor, 0)])
    dt = torch.float64  # λ as the reference's float64 grid, rounded to x's dtype in-kernel
    tables = [chunks.to(i32), cls.to(i32), amask.to(torch.int8), pstart.to(i32), pu.to(i32),
              pw.to(i32), pl.to(dt), pp.to(i32), pok.to(torch.int8), soff.to(i32), su.to(i32),
              sw.to(i32), sl.to(dt), sp.to(i32)]
    max_side = 1 + n * most_ends  # the kernels' side block: itself, n per segment it ends
    return [t.contiguous() for t in tables], (kb, max_side)


def prepare(x_unit, labels, seg_i, seg_j, n_points: int, anchor_mask=None, neg_mask=None):
    """The label-sorted batch: (order, slot of each row, xs, its layout for the ops
    (layout_tables), the synthetic points' norms (differentiable))."""
    b, dev = x_unit.shape[0], x_unit.device
    ones = torch.ones(b, dtype=torch.bool, device=dev)
    amask = ones if anchor_mask is None else anchor_mask
    nmask = ones if neg_mask is None else neg_mask
    labels = labels.long()
    order = torch.argsort(labels, stable=True)
    slot = torch.empty_like(order)
    slot[order] = torch.arange(b, device=dev)
    xs, ys = x_unit.index_select(0, order).contiguous(), labels.index_select(0, order)
    n = int(n_points)
    seg_u, seg_w = slot[seg_i.long()], slot[seg_j.long()]
    layout = [t.contiguous() for t in (ys, seg_u, seg_w, amask[order], nmask[order])]
    pnorm = segment_norms_triton(xs, seg_u, seg_w, n)  # (one kernel each way)
    return order, slot, xs, layout, pnorm


def ee_neg_lse_triton(x_unit, labels, seg_i, seg_j, n_points: int, l2: bool, scale: float,
                      offset: float, anchor_mask=None, neg_mask=None):
    """ops.ee_losses.ee_neg_lse on the Triton engine: (B,) log Σ_{q ∈ Q_i} exp(scale·m̂ + offset)
    per anchor in the caller's order, −inf where none; differentiable in x_unit. Units of at
    most EE_MAX_CLASS rows (covers)."""
    _, slot, xs, layout, pnorm = prepare(x_unit, labels, seg_i, seg_j, n_points, anchor_mask,
                                         neg_mask)
    lse = call(torch.ops.metrix_ops.triton_ee_neg_lse_fwd, xs, pnorm, layout, int(n_points),
               bool(l2), float(scale), float(offset))
    return lse.index_select(0, slot)


def covers(x, labels, pairs: str) -> bool:
    """Triton runs on x's device and every chunk unit has at most EE_MAX_CLASS rows (any
    class with pairs="adjacent"; with "all", classes of at most EE_MAX_CLASS rows)."""
    return usable_on(x.device, x.dtype) and largest_unit_fits(labels, pairs)
