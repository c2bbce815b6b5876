"""LiftedStructureLoss on the Triton engine (backend="triton"), the batch against itself: per
positive pair (a, p), ½[logaddexp(lse⁻_a, lse⁻_p) + pos exponent]₊² (common/lifted.h, PML's
form: the negatives of the anchor's row and of the partner's row), reduced per anchor as the
sum and count of the terms the reducer keeps (low < term < high), then PML's pos-pair
reduction as a ratio of totals (fused/lifted_structure.py, shared with the CPU engine).

Kernels, on label-sorted rows (so a row's positives are one contiguous run of columns):
- lse⁻ per row: the two-side log-sum-exp kernel of side_lse.py (GeneralizedLifted's kind:
  the same negative exponents m⁻ − d, or s − m⁻ for cosine);
- `_lifted_pos_kernel`, one program per BLOCK_M rows, visiting only the columns of its rows'
  classes: forward, the rows' kept sums and counts; backward (BWD), the positive entries of
  G summed over both orders, c_ap + c_pa with c_ap = g_a·[kept]·h₊·∂h/∂s, times X (tl.dot),
  and the rows' weights w_a = Σ_p (g_a + g_p)·[kept]·h₊·σ_a on their lse⁻, σ_a the share of
  lse⁻_a in the pair's logaddexp. The pair's term is symmetric in (a, p), so both orders are
  one entry;
- the negative entries of G, w_a·e^{exponent − lse⁻_a}·slope, through the shared symmetric
  gradient kernel of pairs.py with GeneralizedLifted's G tile (its positive side switched off
  by an lse⁺ of +inf: e^{−inf} = 0).
No B×B matrix is stored; the positive passes cost O(Σ class²·D), the negative ones O(B²·D).
The L2 of rows of any norm takes every kernel's RAW form (s read as 1 − d²/2 from the rows'
norms, tiles.raw_unit_sims; the positive pass adds the radial gradient part as the shared
gradient kernels do)."""
import math

import torch

from ..ops.autograd import call, register_autograd
import triton
import triton.language as tl

from .. import fused
from ..distances import is_dot_of_normalized, is_normalized_l2, is_raw_l2
from ..fused.lifted_structure import lifted_loss
from ..fused.raw_l2 import raw_at
from ..ops.contrastive import _bound
from .generalized_lifted import (GEN_LIFTED_COS, GEN_LIFTED_L2, _lifted_grad_tile_cos,
                                 _lifted_grad_tile_l2)
from .launch import triton_op, usable_on
from .pairs import launch_config, loss_constants, max_dim, pair_grads
from .side_lse import side_lse_launch
from .tiles import (add_tile_product, count_true, minus_radial, pair_masks, raw_table,
                    raw_unit_sims, sim_tile)


@triton.jit
def _lifted_pos_kernel(x_ptr, lab_ptr, lo_ptr, hi_ptr, ln_ptr, g_ptr, prm_ptr, sum_ptr,
                       cnt_ptr, w_ptr, dx_ptr, raw_ptr, B, D, stride_x, stride_dx,
                       BWD: tl.constexpr, COSINE: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
                       ACC: tl.constexpr, PRECISION: tl.constexpr, RAW: tl.constexpr = False):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < B
    lab_m = tl.load(lab_ptr + offs_m, mask=row_ok, other=0)
    la = tl.load(ln_ptr + offs_m, mask=row_ok, other=float("-inf")).to(ACC)
    pm = tl.load(prm_ptr)
    low, high = tl.load(prm_ptr + 3), tl.load(prm_ptr + 4)
    # the columns of this tile's classes: [min run start, max run end) of its rows
    n_lo = tl.min(tl.load(lo_ptr + offs_m, mask=row_ok, other=B))
    n_hi = tl.max(tl.load(hi_ptr + offs_m, mask=row_ok, other=0))
    if BWD:
        g_m = tl.load(g_ptr + offs_m, mask=row_ok, other=0.0).to(ACC)
        w = tl.zeros((BLOCK_M,), ACC)
        acc = tl.zeros((BLOCK_M, BLOCK_DO), ACC)
        gsum = tl.zeros((BLOCK_M,), ACC)
    else:
        sums = tl.zeros((BLOCK_M,), ACC)
        cnt = tl.zeros((BLOCK_M,), tl.int32)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        col_ok = offs_n < n_hi
        lab_n = tl.load(lab_ptr + offs_n, mask=col_ok, other=0)
        lp = tl.load(ln_ptr + offs_n, mask=col_ok, other=float("-inf")).to(ACC)
        s = sim_tile(x_ptr, x_ptr, offs_m, offs_n, B, B, D, stride_x, stride_x,
                     BLOCK_M, BLOCK_N, BLOCK_D, ACC, PRECISION)
        if RAW:  # rows of any norm: the similarity unit rows have at their distance
            s = raw_unit_sims(s, raw_ptr, offs_m, offs_n, B, B)
        pos, _ = pair_masks(offs_m, offs_n, lab_m, lab_n, B, n_hi, True)
        # logaddexp(lse⁻_a, lse⁻_p), 0 with both absent, and lse⁻_a's share σ_a
        mx = tl.maximum(la[:, None], lp[None, :])
        mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
        ea = tl.exp(la[:, None] - mx_safe)
        tot = ea + tl.exp(lp[None, :] - mx_safe)
        has = mx > float("-inf")
        lse = tl.where(has, mx_safe + tl.log(tl.where(has, tot, 1.0)), 0.0)
        if COSINE:
            h = lse + pm - s
            k = tl.full(s.shape, 1.0, s.dtype)
        else:
            q = 2.0 - 2.0 * s
            d = tl.where(q > tl.load(prm_ptr + 2), tl.sqrt(tl.maximum(q, 0.0)), 0.0)
            h = lse + d - pm
            k = tl.where(d > 0.0, 1.0 / tl.where(d > 0.0, d, 1.0), 0.0)
        hp = tl.maximum(h, 0.0)
        val = 0.5 * hp * hp
        keep = pos & (val > low) & (val < high)
        if BWD:
            g_n = tl.load(g_ptr + offs_n, mask=col_ok, other=0.0).to(ACC)
            c = tl.where(keep, (g_m[:, None] + g_n[None, :]) * hp, 0.0)
            w += tl.sum(c * tl.where(has, ea / tl.where(has, tot, 1.0), 0.0), axis=1)
            # ∂h/∂s = −k in both distances (pos exponent m⁺ − s, or d − m⁺)
            acc = add_tile_product(acc, -c * k, x_ptr, offs_n, B, D, stride_x, BLOCK_DO,
                                   PRECISION)
            if RAW:  # the tile as the product took it (rounded to the rows' dtype)
                gsum += tl.sum((-c * k).to(x_ptr.dtype.element_ty).to(ACC), axis=1)
        else:
            sums += tl.sum(tl.where(keep, val, 0.0), axis=1)
            cnt += count_true(keep, 1)
    if BWD:
        tl.store(w_ptr + offs_m, w, mask=row_ok)
        if RAW:
            acc = minus_radial(acc, gsum, x_ptr, offs_m, B, D, stride_x, BLOCK_DO, ACC)
        offs_d = tl.arange(0, BLOCK_DO)
        tl.store(dx_ptr + offs_m[:, None] * stride_dx + offs_d[None, :], acc,
                 mask=row_ok[:, None] & (offs_d[None, :] < D))
    else:
        tl.store(sum_ptr + offs_m, sums, mask=row_ok)
        tl.store(cnt_ptr + offs_m, cnt.to(tl.int64), mask=row_ok)


def _kind(cosine: bool) -> int:
    return GEN_LIFTED_COS if cosine else GEN_LIFTED_L2


def _pos_launch(x, labels, lo, hi, lneg, prm, cosine, raw, g=None):
    """The positive pass: (sums, counts) forward; (w, dX of the positive entries) with g."""
    b, d = x.shape
    bwd = g is not None
    cfg, block_do, warps = launch_config(x, x, grad=bwd)
    none = x.new_empty(0)  # the pointers the other direction's pass does not touch
    if bwd:
        w, dx = torch.empty_like(lneg), torch.empty_like(x)
        sums, cnt = none, none
    else:
        sums, cnt = torch.empty_like(lneg), torch.empty(b, dtype=torch.long, device=x.device)
        g, w, dx = none, none, none
    _lifted_pos_kernel[(triton.cdiv(b, cfg["BLOCK_M"]),)](
        x, labels, lo, hi, lneg, g, prm, sums, cnt, w, dx, raw_table(x, x) if raw else x, b, d,
        x.stride(0), dx.stride(0) if bwd else 0, BWD=bwd, COSINE=bool(cosine), RAW=bool(raw),
        BLOCK_DO=block_do, **cfg, **warps)
    return (w, dx) if bwd else (sums, cnt)


def _constants(x, pos_margin, neg_margin, low, high):
    # GeneralizedLifted's three (m⁺, m⁻, d² below 8 ulps taken as 0), then the kept window
    return loss_constants(x, pos_margin, neg_margin, 8 * torch.finfo(x.dtype).eps, low, high)


_FWD = "metrix_ops::triton_lifted_rows"
_BWD = "metrix_ops::triton_lifted_rows_bwd"


@triton_op(_FWD)
def _lifted_rows_op(x: torch.Tensor, labels: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                    cosine: bool, pos_margin: float, neg_margin: float, low: float,
                    high: float, raw: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kept sums, kept counts, lse⁻) per row of label-sorted unit rows x; lo/hi: each row's
    run of equal labels [lo, hi). raw: rows of any norm, at their L2 distances."""
    x, labels = x.contiguous(), labels.contiguous().long()
    prm = _constants(x, pos_margin, neg_margin, low, high)
    _, _, lneg = side_lse_launch(_kind(cosine), prm, x, x, labels, labels, True, raw)
    if x.shape[0] == 0:
        return lneg.clone(), torch.zeros(0, dtype=torch.long, device=x.device), lneg
    sums, counts = _pos_launch(x, labels, lo.contiguous(), hi.contiguous(), lneg, prm, cosine,
                               raw)
    return sums, counts, lneg


@_lifted_rows_op.register_fake
def _(x, labels, lo, hi, cosine, pos_margin, neg_margin, low, high, raw=False):
    b = x.shape[0]
    return x.new_empty(b), x.new_empty(b, dtype=torch.long), x.new_empty(b)


@triton_op(_BWD)
def _lifted_rows_bwd_op(g_sums: torch.Tensor, x: torch.Tensor, labels: torch.Tensor,
                        lo: torch.Tensor, hi: torch.Tensor, lneg: torch.Tensor, cosine: bool,
                        pos_margin: float, neg_margin: float, low: float, high: float,
                        raw: bool = False) -> torch.Tensor:
    x, labels = x.contiguous(), labels.contiguous().long()
    if x.shape[0] == 0:
        return torch.zeros_like(x)
    prm = _constants(x, pos_margin, neg_margin, low, high)
    w, dx = _pos_launch(x, labels, lo.contiguous(), hi.contiguous(), lneg, prm, cosine, raw,
                        g=g_sums.to(x.dtype).contiguous())
    no_pos = torch.full_like(lneg, float("inf"))  # lse⁺ = +inf: G's positive entries are 0
    grad_tile = _lifted_grad_tile_cos if cosine else _lifted_grad_tile_l2
    dx_neg, _ = pair_grads(grad_tile, x, x, labels, labels, prm,
                           (w, no_pos, lneg.contiguous()), True, True, True, False, raw=raw)
    return dx + dx_neg


@_lifted_rows_bwd_op.register_fake
def _(g_sums, x, labels, lo, hi, lneg, cosine, pos_margin, neg_margin, low, high, raw=False):
    return torch.empty_like(x)


def _setup(ctx, inputs, output):
    x, labels, lo, hi, *args = inputs
    ctx.save_for_backward(x, labels, lo, hi, output[2])
    ctx.args = tuple(args)
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, g_sums, _g_cnt, _g_ln):
    x, labels, lo, hi, lneg = ctx.saved_tensors
    g_sums = torch.zeros_like(lneg) if g_sums is None else g_sums
    dx = torch.ops.metrix_ops.triton_lifted_rows_bwd(g_sums, x, labels, lo, hi, lneg, *ctx.args)
    return (dx,) + (None,) * (len(ctx.args) + 3)


register_autograd(_FWD, _backward, setup_context=_setup)


def lifted_rows_triton(x_unit, labels, cosine: bool, pos_margin: float, neg_margin: float,
                       low: float, high: float, raw: bool = False):
    """(sums, counts) over anchors (in label-sorted order) of the kept lifted terms of their
    positive pairs, the batch of unit rows against itself; differentiable in x_unit. low,
    high: the reducer's window (None: unbounded). raw: rows of any norm, at their L2
    distances."""
    order = torch.argsort(labels, stable=True)
    ys = labels.index_select(0, order)
    lo = torch.searchsorted(ys, ys, right=False)
    hi = torch.searchsorted(ys, ys, right=True)
    sums, counts, _ = call(torch.ops.metrix_ops.triton_lifted_rows,
        x_unit.index_select(0, order), ys, lo.int(), hi.int(), bool(cosine), float(pos_margin),
        float(neg_margin), _bound(low, -math.inf), _bound(high, math.inf), bool(raw))
    return sums, counts


def supports(params, inp, expansion) -> bool:
    """The batch against itself (PML's partner rows of a ref_emb call are not covered), the
    CPU engine's distances: normalised L2, a cosine of rows the distance normalises, and the
    L2 of raw rows (the kernels' RAW form)."""
    x, d = inp.embeddings, inp.distance
    return (expansion is None and inp.indices_tuple is None and inp.labels is not None
            and inp.same_set and inp.ref_emb is x and inp.ref_labels is inp.labels
            and (is_normalized_l2(d) or is_dot_of_normalized(d) or raw_at(inp, powers=(1,)))
            and x.shape[1] <= max_dim(x.dtype) and usable_on(x.device, x.dtype))


def impl(params, inp, reducer):
    raw = is_raw_l2(inp.distance)

    def rows(xu, cosine, pm, nm, low, high):
        return lifted_rows_triton(xu, inp.labels, cosine, pm, nm, low, high, raw)
    return lifted_loss(params, inp, reducer, rows)


fused.register("triton", "LiftedStructureLoss", supports, impl)
