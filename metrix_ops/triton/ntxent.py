"""NTXentLoss and SupConLoss on the Triton engine: unit anchors x (B×D) against unit
references r (M×D; the batch itself, or ref_emb), S = x rᵀ streamed in tiles by tl.dot, never
B×M in memory. Logits z = s/τ (cosine similarity only). The per-element math is the CPU op's
(csrc/common/ntxent.h): PML's shift and `tiny` guard for NT-Xent's pair probability, the
softmax over an anchor's pairs for SupCon.

Statistics are per anchor (row):
- NT-Xent, per positive pair (a, p): −log(q + tiny), q = e^{z_ap}/(e^{z_ap} + Σ_{n∈N(a)} e^{z_an}).
  The forward makes two passes over an anchor's row: the negatives' online log-sum-exp
  (max m, Σ e^{z−m}), then each positive pair's loss from it. PML reduces per positive pair;
  the forward returns per anchor the sum and count of its pair losses inside the reducer's
  window (low < loss < high), and the total weight W = Σ_kept q(1−q)/(q + tiny) its kept pairs
  put on its negatives' softmax: Mean, Sum, AvgNonZero and Threshold are exact ratios of those
  totals (fused/ntxent.py's ntxent_from_rows, shared with the CPU op); any other reducer gets
  the reference.
- SupCon, per anchor: lse over its pairs − mean of its positives' logits (0 without
  positives): one pass (online log-sum-exp, positives' count and logit sum); "element"
  reduced, so every reducer applies to the rows.

Program layout: forward and dX = G r are row programs (an anchor's statistics finish in one
program; its dX row accumulates in registers and is written once); dR = Gᵀ x is column
programs over the references, streaming the anchors with their statistics loaded along the
tile (two kernels, no atomics: see proxy_anchor.py). With r the batch itself (the same
tensor), autograd adds dX and dR. Self pairs (i, i) are no pair when `same_set` (PML's rule:
the reference labels are the batch labels).
"""
from __future__ import annotations

import math

import torch

from ..ops.autograd import call, register_autograd
from ..distances import is_cosine
from ..fused.ntxent import ntxent_from_rows, supcon_from_rows
from .launch import HAS_TRITON, triton_op
from .proxy_anchor import _grids, column_grads, hyper, tile_config

NTXENT, SUPCON = 0, 1  # the kernels' LOSS

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .proxy_anchor import online_lse, rows_product, store_rows
    from .tiles import count_true, sim_tile

    @triton.jit
    def _pair_masks(ia, jr, ya, yr, n_a, n_r, SAME: tl.constexpr):
        """(positive, negative) pair masks of a tile from broadcastable anchor indices and
        labels ia, ya and reference indices and labels jr, yr."""
        valid = (ia < n_a) & (jr < n_r)
        pos = valid & (ya == yr)
        if SAME:
            pos = pos & (ia != jr)
        # (!= rather than ~(==): triton 3.2's interpreter cannot invert a bool tile)
        return pos, valid & (ya != yr)

    @triton.jit
    def _ntx_prob(z, m, l):
        """(q, 1 − q) of a positive pair of logit z against its anchor's negatives (max m,
        Σ e^{z_n − m} = l), with PML's shift max(z, m) (ntx_prob of ntxent.h); an anchor
        without negatives (m = −inf, l = 0) gives q = 1. Both branches are finite."""
        ge = z >= m
        e = l * tl.exp(tl.minimum(m - z, 0.0))  # the z ≥ m branch: num = 1
        num = tl.exp(tl.minimum(z - m, 0.0))  # the z < m branch
        q = tl.where(ge, 1.0 / (1.0 + e), num / (l + num))
        rest = tl.where(ge, e / (1.0 + e), l / (l + num))
        return q, rest

    @triton.jit
    def _pair_grad(z, pos, neg, g, sa, sb, sc, inv_t, tiny, low, high, LOSS: tl.constexpr):
        """∂L/∂s of each entry from its anchor's statistics (broadcast along the anchor axis):
        NT-Xent (sa, sb, sc) = (negatives' max, Σ e^{z−max}, W); SupCon (lse over the pairs,
        number of positives, unused); g the anchor row's upstream gradient."""
        if LOSS == 0:
            q, rest = _ntx_prob(z, sa, sb)
            loss = -tl.log(q + tiny)
            kept = pos & (loss > low) & (loss < high)
            # the negatives' softmax (z ≤ their max sa; the clamp keeps the entries that are
            # not negatives finite, also for an anchor without negatives, sa = −inf)
            sm = tl.exp(tl.minimum(z - sa, 0.0)) / tl.where(sb > 0, sb, 1.0)
            gz = tl.where(kept, -(q * rest / (q + tiny)), 0.0) + tl.where(neg, sc * sm, 0.0)
        else:
            inv_n = 1.0 / tl.where(sb > 0, sb, 1.0)
            sm = tl.exp(tl.minimum(z - sa, 0.0))  # softmax over the pairs (z ≤ their lse)
            gz = tl.where(pos | neg, sm, 0.0) - tl.where(pos, inv_n, 0.0)
            gz = tl.where(sb > 0, gz, 0.0)  # an anchor without positives has loss 0
        return g * inv_t * gz

    @triton.jit
    def _ntx_fwd_kernel(x_ptr, r_ptr, y_ptr, yr_ptr, sums_ptr, counts_ptr, m_ptr, l_ptr, w_ptr,
                        B, M, D, stride_x, stride_r, hp_ptr, SAME: tl.constexpr,
                        BLOCK_A: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                        ACC: tl.constexpr, PRECISION: tl.constexpr):
        inv_t, tiny = tl.load(hp_ptr).to(ACC), tl.load(hp_ptr + 1).to(ACC)
        low, high = tl.load(hp_ptr + 2).to(ACC), tl.load(hp_ptr + 3).to(ACC)
        offs_a = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
        ya = tl.load(y_ptr + offs_a, mask=offs_a < B, other=-1)[:, None]
        m = tl.zeros((BLOCK_A,), dtype=ACC) + float("-inf")
        l = tl.zeros((BLOCK_A,), dtype=ACC)
        for r0 in range(0, M, BLOCK_R):  # pass 1: the negatives' log-sum-exp
            offs_r = r0 + tl.arange(0, BLOCK_R)
            yr = tl.load(yr_ptr + offs_r, mask=offs_r < M, other=-1)[None, :]
            z = inv_t * sim_tile(x_ptr, r_ptr, offs_a, offs_r, B, M, D, stride_x, stride_r,
                                 BLOCK_A, BLOCK_R, BLOCK_D, ACC, PRECISION)
            _, neg = _pair_masks(offs_a[:, None], offs_r[None, :], ya, yr, B, M, SAME)
            m, l = online_lse(m, l, z, neg)
        sums = tl.zeros((BLOCK_A,), dtype=ACC)
        w = tl.zeros((BLOCK_A,), dtype=ACC)
        counts = tl.zeros((BLOCK_A,), dtype=tl.int32)
        for r0 in range(0, M, BLOCK_R):  # pass 2: the positive pairs' losses
            offs_r = r0 + tl.arange(0, BLOCK_R)
            yr = tl.load(yr_ptr + offs_r, mask=offs_r < M, other=-1)[None, :]
            z = inv_t * sim_tile(x_ptr, r_ptr, offs_a, offs_r, B, M, D, stride_x, stride_r,
                                 BLOCK_A, BLOCK_R, BLOCK_D, ACC, PRECISION)
            pos, _ = _pair_masks(offs_a[:, None], offs_r[None, :], ya, yr, B, M, SAME)
            q, rest = _ntx_prob(z, m[:, None], l[:, None])
            loss = -tl.log(q + tiny)
            kept = pos & (loss > low) & (loss < high)
            sums += tl.sum(tl.where(kept, loss, 0.0), 1)
            counts += count_true(kept, 1)
            w += tl.sum(tl.where(kept, q * rest / (q + tiny), 0.0), 1)
        in_a = offs_a < B
        tl.store(sums_ptr + offs_a, sums, mask=in_a)
        tl.store(counts_ptr + offs_a, counts, mask=in_a)
        tl.store(m_ptr + offs_a, m, mask=in_a)
        tl.store(l_ptr + offs_a, l, mask=in_a)
        tl.store(w_ptr + offs_a, w, mask=in_a)

    @triton.jit
    def _sup_fwd_kernel(x_ptr, r_ptr, y_ptr, yr_ptr, rows_ptr, lse_ptr, npos_ptr, B, M, D,
                        stride_x, stride_r, hp_ptr, SAME: tl.constexpr, BLOCK_A: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
                        PRECISION: tl.constexpr):
        inv_t = tl.load(hp_ptr).to(ACC)
        offs_a = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
        in_a = offs_a < B
        ya = tl.load(y_ptr + offs_a, mask=in_a, other=-1)[:, None]
        m = tl.zeros((BLOCK_A,), dtype=ACC) + float("-inf")
        l = tl.zeros((BLOCK_A,), dtype=ACC)
        n_pos = tl.zeros((BLOCK_A,), dtype=ACC)
        pos_z = tl.zeros((BLOCK_A,), dtype=ACC)
        for r0 in range(0, M, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            yr = tl.load(yr_ptr + offs_r, mask=offs_r < M, other=-1)[None, :]
            z = inv_t * sim_tile(x_ptr, r_ptr, offs_a, offs_r, B, M, D, stride_x, stride_r,
                                 BLOCK_A, BLOCK_R, BLOCK_D, ACC, PRECISION)
            pos, neg = _pair_masks(offs_a[:, None], offs_r[None, :], ya, yr, B, M, SAME)
            m, l = online_lse(m, l, z, pos | neg)
            n_pos += tl.sum(pos.to(ACC), 1)
            pos_z += tl.sum(tl.where(pos, z, 0.0), 1)
        lse = m + tl.log(tl.where(l > 0, l, 1.0))  # no pairs (B = M = 1): never used
        rows = tl.where(n_pos > 0, lse - pos_z / tl.where(n_pos > 0, n_pos, 1.0), 0.0)
        tl.store(rows_ptr + offs_a, rows, mask=in_a)
        tl.store(lse_ptr + offs_a, lse, mask=in_a)
        tl.store(npos_ptr + offs_a, n_pos, mask=in_a)

    @triton.jit
    def _pair_dx_kernel(x_ptr, r_ptr, y_ptr, yr_ptr, g_ptr, sa_ptr, sb_ptr, sc_ptr, dx_ptr,
                        B, M, D, stride_x, stride_r, stride_dx, hp_ptr, LOSS: tl.constexpr,
                        SAME: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, ACC: tl.constexpr,
                        PRECISION: tl.constexpr):
        inv_t, tiny = tl.load(hp_ptr).to(ACC), tl.load(hp_ptr + 1).to(ACC)
        low, high = tl.load(hp_ptr + 2).to(ACC), tl.load(hp_ptr + 3).to(ACC)
        offs_a = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
        offs_do = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
        in_a = offs_a < B
        ya = tl.load(y_ptr + offs_a, mask=in_a, other=-1)[:, None]
        g = tl.load(g_ptr + offs_a, mask=in_a, other=0.0).to(ACC)[:, None]
        sa = tl.load(sa_ptr + offs_a, mask=in_a, other=0.0).to(ACC)[:, None]
        sb = tl.load(sb_ptr + offs_a, mask=in_a, other=0.0).to(ACC)[:, None]
        sc = tl.load(sc_ptr + offs_a, mask=in_a, other=0.0).to(ACC)[:, None]
        acc = tl.zeros((BLOCK_A, BLOCK_DO), dtype=ACC)
        for r0 in range(0, M, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            yr = tl.load(yr_ptr + offs_r, mask=offs_r < M, other=-1)[None, :]
            z = inv_t * sim_tile(x_ptr, r_ptr, offs_a, offs_r, B, M, D, stride_x, stride_r,
                                 BLOCK_A, BLOCK_R, BLOCK_D, ACC, PRECISION)
            pos, neg = _pair_masks(offs_a[:, None], offs_r[None, :], ya, yr, B, M, SAME)
            gt = _pair_grad(z, pos, neg, g, sa, sb, sc, inv_t, tiny, low, high, LOSS)
            acc = rows_product(acc, gt, r_ptr, offs_r, M, offs_do, D, stride_r, PRECISION)
        store_rows(dx_ptr, acc, offs_a, B, offs_do, D, stride_dx)

    @triton.jit
    def _pair_dr_kernel(x_ptr, r_ptr, y_ptr, yr_ptr, g_ptr, sa_ptr, sb_ptr, sc_ptr, dr_ptr,
                        B, M, D, stride_x, stride_r, stride_dr, split_len, hp_ptr,
                        BLOCK_R: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_DO: tl.constexpr, LOSS: tl.constexpr, SAME: tl.constexpr,
                        ACC: tl.constexpr, PRECISION: tl.constexpr):
        """Split program_id(2)'s part of dR (its anchors only) into dr[split]."""
        a_lo = tl.program_id(2) * split_len
        inv_t, tiny = tl.load(hp_ptr).to(ACC), tl.load(hp_ptr + 1).to(ACC)
        low, high = tl.load(hp_ptr + 2).to(ACC), tl.load(hp_ptr + 3).to(ACC)
        offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_do = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
        yr = tl.load(yr_ptr + offs_r, mask=offs_r < M, other=-1)[:, None]
        acc = tl.zeros((BLOCK_R, BLOCK_DO), dtype=ACC)
        for a0 in range(a_lo, tl.minimum(a_lo + split_len, B), BLOCK_A):
            offs_a = a0 + tl.arange(0, BLOCK_A)
            in_a = offs_a < B
            ya = tl.load(y_ptr + offs_a, mask=in_a, other=-1)[None, :]
            g = tl.load(g_ptr + offs_a, mask=in_a, other=0.0).to(ACC)[None, :]
            sa = tl.load(sa_ptr + offs_a, mask=in_a, other=0.0).to(ACC)[None, :]
            sb = tl.load(sb_ptr + offs_a, mask=in_a, other=0.0).to(ACC)[None, :]
            sc = tl.load(sc_ptr + offs_a, mask=in_a, other=0.0).to(ACC)[None, :]
            zt = inv_t * sim_tile(r_ptr, x_ptr, offs_r, offs_a, M, B, D, stride_r, stride_x,
                                  BLOCK_R, BLOCK_A, BLOCK_D, ACC, PRECISION)  # Sᵀ/τ
            pos, neg = _pair_masks(offs_a[None, :], offs_r[:, None], ya, yr, B, M, SAME)
            gt = _pair_grad(zt, pos, neg, g, sa, sb, sc, inv_t, tiny, low, high, LOSS)
            acc = rows_product(acc, gt, x_ptr, offs_a, B, offs_do, D, stride_x, PRECISION)
        store_rows(dr_ptr + tl.program_id(2) * M * stride_dr, acc, offs_r, M, offs_do, D,
                   stride_dr)


def _check(x, r, labels, ref_labels, temperature):
    """The kernels' contract (internal callers; the user-facing checks run before)."""
    if x.dtype not in (torch.float32, torch.float64) or r.dtype != x.dtype:
        raise TypeError(f"x and r must both be float32 or float64, got {x.dtype} and {r.dtype}")
    if x.ndim != 2 or r.ndim != 2 or x.shape[1] != r.shape[1]:
        raise ValueError(f"x and r must be 2-D with the same D, got {tuple(x.shape)} and "
                         f"{tuple(r.shape)}")
    if labels.dtype != torch.int64 or labels.shape != (x.shape[0],):
        raise ValueError(f"labels must be int64 of shape ({x.shape[0]},)")
    if ref_labels.dtype != torch.int64 or ref_labels.shape != (r.shape[0],):
        raise ValueError(f"ref_labels must be int64 of shape ({r.shape[0]},)")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _hp(x, temperature, low=None, high=None):
    return hyper(x, 1.0 / float(temperature), torch.finfo(x.dtype).tiny,
                 -float("inf") if low is None else low, float("inf") if high is None else high)


def _pair_bwd(loss, x, r, labels, ref_labels, same_set, hp, g, sa, sb, sc, need_dx, need_dr):
    """dX (row programs) and dR (column programs) of either loss, as the inputs need them."""
    B, M, D = x.shape[0], r.shape[0], x.shape[1]
    stats = (g.to(x.dtype).contiguous(), sa, sb, sc)
    common = dict(LOSS=loss, SAME=bool(same_set))
    dx = dr = None
    if need_dx:
        dx = torch.empty_like(x)
        t = tile_config(x, B, M, grad=True)
        _pair_dx_kernel[_grids(B, D, t)](
            x, r, labels, ref_labels, *stats, dx, B, M, D, x.stride(0), r.stride(0),
            dx.stride(0), hp, **common, BLOCK_A=t["own"], BLOCK_R=t["loop"],
            BLOCK_D=t["d"], BLOCK_DO=t["out"], **t["kw"])
    if need_dr:
        dr = column_grads(_pair_dr_kernel, x, r, (x, r, labels, ref_labels, *stats), hp,
                          ("BLOCK_R", "BLOCK_A"), **common)
    return dx, dr


def _prepare(x, r, labels, ref_labels, temperature):
    x, r = x.contiguous(), r.contiguous()
    labels, ref_labels = labels.contiguous(), ref_labels.contiguous()
    _check(x, r, labels, ref_labels, temperature)
    return x, r, labels, ref_labels, tile_config(x, x.shape[0], r.shape[0])


# The launches are torch.library custom ops (fake kernels and autograd registered here), so
# that torch.compile(fullgraph=True) traces the modules around them, as the pair losses'.
_NTX = "metrix_ops::triton_ntxent_rows"
_SUP = "metrix_ops::triton_supcon_rows"


@triton_op(_NTX)
def _ntxent_rows_op(x: torch.Tensor, r: torch.Tensor, labels: torch.Tensor,
                    ref_labels: torch.Tensor, same_set: bool, temperature: float, low: float,
                    high: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                          torch.Tensor, torch.Tensor]:
    """Per anchor (sum, count) of its NT-Xent positive-pair losses inside low < loss < high
    (counts int64, not differentiable), and the row statistics (m, l, w) the backward reads."""
    x, r, labels, ref_labels, t = _prepare(x, r, labels, ref_labels, temperature)
    B, M, D = x.shape[0], r.shape[0], x.shape[1]
    sums, m, l, w = (x.new_empty(B) for _ in range(4))
    counts = torch.empty(B, dtype=torch.int32, device=x.device)
    _ntx_fwd_kernel[(triton.cdiv(B, t["own"]),)](
        x, r, labels, ref_labels, sums, counts, m, l, w, B, M, D, x.stride(0), r.stride(0),
        _hp(x, temperature, low, high), SAME=bool(same_set), BLOCK_A=t["own"],
        BLOCK_R=t["loop"], BLOCK_D=t["d"], **t["kw"])
    return sums, counts.long(), m, l, w


@_ntxent_rows_op.register_fake
def _(x, r, labels, ref_labels, same_set, temperature, low, high):
    b = x.shape[0]
    return (x.new_empty(b), x.new_empty(b, dtype=torch.long), x.new_empty(b), x.new_empty(b),
            x.new_empty(b))


@triton_op(_SUP)
def _supcon_rows_op(x: torch.Tensor, r: torch.Tensor, labels: torch.Tensor,
                    ref_labels: torch.Tensor, same_set: bool, temperature: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-anchor SupCon losses (0 without positives), and (lse, n_pos) for the backward."""
    x, r, labels, ref_labels, t = _prepare(x, r, labels, ref_labels, temperature)
    B, M, D = x.shape[0], r.shape[0], x.shape[1]
    rows, lse, n_pos = (x.new_empty(B) for _ in range(3))
    _sup_fwd_kernel[(triton.cdiv(B, t["own"]),)](
        x, r, labels, ref_labels, rows, lse, n_pos, B, M, D, x.stride(0), r.stride(0),
        _hp(x, temperature), SAME=bool(same_set), BLOCK_A=t["own"], BLOCK_R=t["loop"],
        BLOCK_D=t["d"], **t["kw"])
    return rows, lse, n_pos


@_supcon_rows_op.register_fake
def _(x, r, labels, ref_labels, same_set, temperature):
    return tuple(x.new_empty(x.shape[0]) for _ in range(3))


@triton_op("metrix_ops::triton_ntx_pair_bwd")
def _pair_bwd_op(loss: int, g: torch.Tensor, x: torch.Tensor, r: torch.Tensor,
                 labels: torch.Tensor, ref_labels: torch.Tensor, sa: torch.Tensor,
                 sb: torch.Tensor, sc: torch.Tensor, same_set: bool, temperature: float,
                 low: float, high: float, need_dx: bool, need_dr: bool
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    x, r, labels, ref_labels, _ = _prepare(x, r, labels, ref_labels, temperature)
    dx, dr = _pair_bwd(loss, x, r, labels, ref_labels, same_set, _hp(x, temperature, low, high),
                       g, sa, sb, sc, need_dx, need_dr)
    return (x.new_empty(0) if dx is None else dx), (r.new_empty(0) if dr is None else dr)


@_pair_bwd_op.register_fake
def _(loss, g, x, r, labels, ref_labels, sa, sb, sc, same_set, temperature, low, high,
      need_dx, need_dr):
    return (torch.empty_like(x) if need_dx else x.new_empty(0),
            torch.empty_like(r) if need_dr else r.new_empty(0))


def _setup(ctx, inputs, output, stats, window):
    x, r, labels, ref_labels, same_set, temperature = inputs[:6]
    ctx.save_for_backward(x, r, labels, ref_labels, *stats)
    ctx.args = (same_set, temperature) + window


def _backward(ctx, loss, g):
    x, r, labels, ref_labels, sa, sb, sc = ctx.saved_tensors
    need_dx, need_dr = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx, dr = torch.ops.metrix_ops.triton_ntx_pair_bwd(loss, g, x, r, labels, ref_labels, sa, sb,
                                                      sc, *ctx.args, need_dx, need_dr)
    return (dx if need_dx else None), (dr if need_dr else None)


def _ntx_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])
    _setup(ctx, inputs, output, output[2:], tuple(inputs[6:]))


def _ntx_backward(ctx, g_sums, *_):
    g = torch.zeros_like(ctx.saved_tensors[4]) if g_sums is None else g_sums
    return _backward(ctx, NTXENT, g) + (None,) * 6


def _sup_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])
    lse, n_pos = output[1], output[2]
    _setup(ctx, inputs, output, (lse, n_pos, n_pos), (-math.inf, math.inf))


def _sup_backward(ctx, g_rows, *_):
    return _backward(ctx, SUPCON, g_rows) + (None,) * 4


register_autograd(_NTX, _ntx_backward, setup_context=_ntx_setup)
register_autograd(_SUP, _sup_backward, setup_context=_sup_setup)


def ntxent_rows(x_unit, r_unit, labels, ref_labels, same_set: bool, temperature: float,
                low=None, high=None):
    sums, counts, *_ = call(torch.ops.metrix_ops.triton_ntxent_rows,
        x_unit, r_unit, labels, ref_labels, bool(same_set), float(temperature),
        -math.inf if low is None else float(low), math.inf if high is None else float(high))
    return sums, counts


def supcon_rows(x_unit, r_unit, labels, ref_labels, same_set: bool, temperature: float):
    return call(torch.ops.metrix_ops.triton_supcon_rows, x_unit, r_unit, labels, ref_labels,
                bool(same_set), float(temperature))[0]


def supports(params, inp, expansion) -> bool:
    """Cosine similarity (the default), all pairs of the labels (no indices_tuple), no
    expansion; ref_emb with ref_labels is covered."""
    return (HAS_TRITON and expansion is None and inp.indices_tuple is None
            and inp.labels is not None and inp.ref_labels is not None
            and is_cosine(inp.distance))


def ntxent_impl(params, inp, reducer):
    return ntxent_from_rows(ntxent_rows, params, inp, reducer)


def supcon_impl(params, inp, reducer):
    return supcon_from_rows(supcon_rows, params, inp, reducer)


if HAS_TRITON:
    from ..fused import register

    register("triton", "NTXentLoss", supports, ntxent_impl)
    register("triton", "SupConLoss", supports, supcon_impl)
