"""ContrastiveLoss on the Triton engine (backend="triton"): per anchor, the sums and counts
of the kept positive and negative hinge terms of unit anchors X against unit references R,
flash-attention style, never storing a B×M matrix; PML's per-side reduction is then a ratio
of totals (fused/contrastive.py's _reduce_side, shared with the CPU path).

Terms (csrc/common/contrastive.h, PML's semantics), from s = ⟨x_i, r_j⟩:
  L2 (normalised LpDistance): d = √(2 − 2s) (0 below 8 ulps, so duplicates give d = 0),
      positive [d − m⁺]₊, negative [m⁻ − d]₊;
  cosine: positive [m⁺ − s]₊, negative [s − m⁻]₊.
Rows of any norm at their L2 distance (LpDistance(normalize_embeddings=False)) take the
kernels' RAW form: s is rewritten as 1 − d²/2 from the rows' squared norms
(tiles.raw_unit_sims), and the gradient kernels add the radial part.
A term is kept (summed and counted) when low < t < high, the reducer's window
(AvgNonZero: low = 0; Mean and Sum: everything).

- forward (one program per BLOCK_M anchors): streams column tiles of S by tl.dot and adds
  each tile's kept terms into the rows' sums (in the accumulation type) and counts.
- backward: G_ij = g⁺_i·∂t_ij/∂s_ij on kept positives, g⁻_i·∂t_ij/∂s_ij on kept negatives
  (∂t/∂s = ∓1 for cosine, ∓1/d for L2, 0 where the hinge is flat or d = 0, as torch's
  relu and cdist backward give), with g± the upstream gradients of the row sums. G_ij needs
  row i's weights only, so the shared gradient kernels of triton/pairs.py do dX by row
  programs and dR by column programs, without atomics; for the batch against itself one
  kernel does the whole (G + Gᵀ) X.

Why recompute S in the backward: storing S or G is the B×M memory this op exists to avoid;
recomputing costs one more tile product per tile, cheaper on a GPU than writing and reading
back a B×M matrix, and the forward saves nothing but O(B) row vectors (here: nothing at all
beyond the inputs, the terms are a function of s alone)."""
import math

import torch

from ..ops.autograd import call, register_autograd
import triton
import triton.language as tl

from .. import fused
from ..distances import is_cosine, is_normalized_l2, is_normalized_sq_l2, is_raw_l2
from ..fused.contrastive import _reduce_clean, _scaled, _window, op_form
from ..fused.raw_l2 import raw_at
from ..fused.pair_counts import pair_count_tensors
from ..ops.contrastive import _bound
from ..reducers import reduce_loss_dict
from ..spec import get_spec
from ..ops.unit_rows import unit_rows
from .launch import triton_op, usable_on
from .pairs import (fake_grads, grads_or_empty, is_symmetric, launch_config, loss_constants,
                    max_dim, needs_grads, pair_grads)
from .tiles import count_true, pair_masks, raw_table, raw_unit_sims, sim_tile


@triton.jit
def _con_terms(s, pos, neg, prm_ptr, COSINE: tl.constexpr):
    """(term, kept positive, kept negative, |∂term/∂s|) of a tile; the slope is 0 where the
    hinge is flat (term ≤ 0) and, for L2, where d = 0."""
    pm, nm = tl.load(prm_ptr), tl.load(prm_ptr + 1)
    low, high = tl.load(prm_ptr + 2), tl.load(prm_ptr + 3)
    if COSINE:
        t = tl.maximum(tl.where(pos, pm - s, s - nm), 0.0)
        mag = (t > 0.0).to(s.dtype)
    else:
        q = 2.0 - 2.0 * s
        # d² = 2 − 2s carries the rounding of s: below 8 ulps it is 0 (contrastive.h)
        d = tl.where(q > tl.load(prm_ptr + 4), tl.sqrt(tl.maximum(q, 0.0)), 0.0)
        t = tl.maximum(tl.where(pos, d - pm, nm - d), 0.0)
        mag = tl.where((t > 0.0) & (d > 0.0), 1.0 / tl.where(d > 0.0, d, 1.0), 0.0)
    keep = (t > low) & (t < high)
    return t, pos & keep, neg & keep, mag


@triton.jit
def _con_grad_tile(s, pos, neg, gp, gn, unused, prm_ptr, COSINE: tl.constexpr):
    _, kp, kn, mag = _con_terms(s, pos, neg, prm_ptr, COSINE)
    # positive terms fall as s grows (slope −mag), negative terms rise (+mag)
    return tl.where(kp, -gp[:, None] * mag, tl.where(kn, gn[:, None] * mag, 0.0))


@triton.jit
def _con_grad_tile_cos(s, pos, neg, gp, gn, unused, prm_ptr):
    return _con_grad_tile(s, pos, neg, gp, gn, unused, prm_ptr, True)


@triton.jit
def _con_grad_tile_l2(s, pos, neg, gp, gn, unused, prm_ptr):
    return _con_grad_tile(s, pos, neg, gp, gn, unused, prm_ptr, False)


@triton.jit
def _con_fwd_kernel(x_ptr, r_ptr, lab_ptr, rlab_ptr, prm_ptr, ps_ptr, pc_ptr, ns_ptr, nc_ptr,
                    raw_ptr, B, M, D, stride_x, stride_r, COSINE: tl.constexpr,
                    EXCLUDE_DIAG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                    RAW: tl.constexpr = False):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < B
    lab_m = tl.load(lab_ptr + offs_m, mask=row_ok, other=0)
    psum = tl.zeros((BLOCK_M,), dtype=ACC)
    nsum = tl.zeros((BLOCK_M,), dtype=ACC)
    pcnt = tl.zeros((BLOCK_M,), dtype=tl.int32)
    ncnt = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for n0 in range(0, M, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        lab_n = tl.load(rlab_ptr + offs_n, mask=offs_n < M, other=0)
        s = sim_tile(x_ptr, r_ptr, offs_m, offs_n, B, M, D, stride_x, stride_r,
                     BLOCK_M, BLOCK_N, BLOCK_D, ACC, PRECISION)
        if RAW:  # rows of any norm: the similarity unit rows have at their distance
            s = raw_unit_sims(s, raw_ptr, offs_m, offs_n, B, M)
        pos, neg = pair_masks(offs_m, offs_n, lab_m, lab_n, B, M, EXCLUDE_DIAG)
        t, kp, kn, _ = _con_terms(s, pos, neg, prm_ptr, COSINE)
        psum += tl.sum(tl.where(kp, t, 0.0), axis=1)
        nsum += tl.sum(tl.where(kn, t, 0.0), axis=1)
        pcnt += count_true(kp, 1)
        ncnt += count_true(kn, 1)
    tl.store(ps_ptr + offs_m, psum, mask=row_ok)
    tl.store(ns_ptr + offs_m, nsum, mask=row_ok)
    tl.store(pc_ptr + offs_m, pcnt.to(tl.int64), mask=row_ok)
    tl.store(nc_ptr + offs_m, ncnt.to(tl.int64), mask=row_ok)


def _con_forward(x, r, labels, ref_labels, exclude_diag, cosine, prm, raw):
    b = x.shape[0]
    sums = [torch.empty(b, dtype=x.dtype, device=x.device) for _ in range(2)]
    counts = [torch.empty(b, dtype=torch.long, device=x.device) for _ in range(2)]
    cfg, _, warps = launch_config(x, r)
    _con_fwd_kernel[(triton.cdiv(b, cfg["BLOCK_M"]),)](
        x, r, labels, ref_labels, prm, sums[0], counts[0], sums[1], counts[1],
        raw_table(x, r) if raw else x, b, r.shape[0], x.shape[1], x.stride(0), r.stride(0),
        COSINE=cosine, EXCLUDE_DIAG=exclude_diag, RAW=raw, **cfg, **warps)
    return sums[0], counts[0], sums[1], counts[1]


def _con_backward(gp, gn, x, r, labels, ref_labels, exclude_diag, symmetric, cosine, prm, raw,
                  need_x, need_r):
    tile = _con_grad_tile_cos if cosine else _con_grad_tile_l2
    return pair_grads(tile, x, r, labels, ref_labels, prm, (gp, gn, gn), exclude_diag,
                      symmetric, need_x, need_r, raw=raw)


# The launches are torch.library custom ops, as in triton/multi_similarity.py: opaque to
# torch.compile, with fake kernels and autograd registered here.
_FWD = "metrix_ops::triton_contrastive_rows"


def _constants(x, pos_margin, neg_margin, low, high):
    # the last one: d² below 8 ulps of x's dtype is taken as 0 (contrastive.h)
    return loss_constants(x, pos_margin, neg_margin, low, high, 8 * torch.finfo(x.dtype).eps)


@triton_op(_FWD)
def _con_rows_op(x: torch.Tensor, r: torch.Tensor, labels: torch.Tensor,
                 ref_labels: torch.Tensor, exclude_diag: bool, symmetric: bool,
                 cosine: bool, pos_margin: float, neg_margin: float, low: float, high: float,
                 raw: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x, r = x.contiguous(), r.contiguous()
    return _con_forward(x, r, labels.contiguous().long(), ref_labels.contiguous().long(),
                        exclude_diag, cosine, _constants(x, pos_margin, neg_margin, low, high),
                        raw)


@_con_rows_op.register_fake
def _(x, r, labels, ref_labels, exclude_diag, symmetric, cosine, pos_margin, neg_margin, low,
      high, raw=False):
    b = x.shape[0]
    return (x.new_empty(b), x.new_empty(b, dtype=torch.long), x.new_empty(b),
            x.new_empty(b, dtype=torch.long))


@triton_op("metrix_ops::triton_contrastive_rows_bwd")
def _con_rows_bwd_op(grad_pos: torch.Tensor, grad_neg: torch.Tensor, x: torch.Tensor,
                     r: torch.Tensor, labels: torch.Tensor, ref_labels: torch.Tensor,
                     exclude_diag: bool, symmetric: bool, cosine: bool, pos_margin: float,
                     neg_margin: float, low: float, high: float, raw: bool, need_x: bool,
                     need_r: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x, r = x.contiguous(), r.contiguous()
    dx, dr = _con_backward(grad_pos.to(x.dtype).contiguous(), grad_neg.to(x.dtype).contiguous(),
                           x, r, labels.contiguous().long(), ref_labels.contiguous().long(),
                           exclude_diag, symmetric, cosine,
                           _constants(x, pos_margin, neg_margin, low, high), raw, need_x,
                           need_r)
    return grads_or_empty(dx, dr, x)


@_con_rows_bwd_op.register_fake
def _(grad_pos, grad_neg, x, r, labels, ref_labels, exclude_diag, symmetric, cosine,
      pos_margin, neg_margin, low, high, raw, need_x, need_r):
    return fake_grads(x, r, need_x, need_r)


def _con_setup(ctx, inputs, output):
    x, r, labels, ref_labels, *consts = inputs
    ctx.save_for_backward(x, r, labels, ref_labels)
    ctx.n_inputs = len(inputs)
    # (a call may leave out raw, the last of the op's 8 non-tensor arguments: its default)
    ctx.consts = tuple(consts) + (False,) * (8 - len(consts))
    ctx.mark_non_differentiable(output[1], output[3])


def _con_backward_rule(ctx, g_pos, _g_pc, g_neg, _g_nc):
    x = ctx.saved_tensors[0]
    # an output nobody used may come back as None
    g_pos, g_neg = (x.new_zeros(x.shape[0]) if g is None else g for g in (g_pos, g_neg))
    need_x, need_r = needs_grads(ctx, ctx.consts[1])
    dx, dr = torch.ops.metrix_ops.triton_contrastive_rows_bwd(
        g_pos, g_neg, *ctx.saved_tensors, *ctx.consts, need_x, need_r)
    return ((dx if need_x else None), (dr if need_r else None)) + (None,) * (ctx.n_inputs - 2)


register_autograd(_FWD, _con_backward_rule, setup_context=_con_setup)


def contrastive_rows_triton(x_unit, r_unit, labels, ref_labels, exclude_diag: bool,
                            cosine: bool, pos_margin: float, neg_margin: float, low=None,
                            high=None, raw: bool = False):
    """The Triton twin of ops.contrastive_rows: per-anchor (pos_sum, pos_count, neg_sum,
    neg_count) of the kept hinge terms of unit rows x_unit against unit rows r_unit; low/high
    bound the kept terms (None: unbounded). The sums are differentiable; the counts are int64
    and are not. The batch against itself (r_unit *is* x_unit, ref_labels *is* labels,
    exclude_diag) takes the symmetric gradient kernel. raw: rows of any norm, at their L2
    distances (each product read as 1 − d²/2: tiles.raw_unit_sims)."""
    return call(torch.ops.metrix_ops.triton_contrastive_rows,
        x_unit, r_unit, labels, ref_labels, bool(exclude_diag),
        is_symmetric(x_unit, r_unit, labels, ref_labels, exclude_diag), bool(cosine),
        float(pos_margin), float(neg_margin), _bound(low, -math.inf), _bound(high, math.inf),
        bool(raw))


def supports(params, inp, expansion) -> bool:
    """Cosine, the L2 and squared L2 of unit rows, and the L2 or squared L2 of raw rows (the
    kernels' RAW form)."""
    d, x = inp.distance, inp.embeddings
    return (expansion is None and inp.indices_tuple is None and inp.labels is not None
            and (is_normalized_l2(d) or is_cosine(d) or is_normalized_sq_l2(d) or raw_at(inp))
            and x.shape[1] <= max_dim(x.dtype) and usable_on(x.device, x.dtype))


def impl(params, inp, reducer):
    x = inp.embeddings
    window = _window(reducer)
    if window is None:  # a reducer that is not a ratio of totals: the reference's pair terms
        return reduce_loss_dict(get_spec("ContrastiveLoss").loss_dict(inp, **params), reducer, x)
    n_pos, n_neg = pair_count_tensors(inp.labels, inp.ref_labels, inp.same_set)
    # squared L2 (of unit rows, or the raw rows' 2 − 2s̃) is 2 − 2s: the cosine kernels at
    # moved margins, their sums scaled (the CPU engine's op_form)
    cosine, pm, nm, (low, high), scale = op_form(inp.distance, params, window, x.dtype)
    raw = is_raw_l2(inp.distance)
    xo = x if raw else unit_rows(x)
    # the batch against itself, self pairs excluded: one tensor passed twice
    if inp.ref_emb is x and inp.same_set:
        ro = xo
    else:
        ro = inp.ref_emb if raw else unit_rows(inp.ref_emb)
    rows = contrastive_rows_triton(xo, ro, inp.labels, inp.ref_labels, inp.same_set, cosine,
                                   pm, nm, low, high, raw)
    return _reduce_clean(_scaled(rows, scale), n_pos, n_neg, reducer, x)


fused.register("triton", "ContrastiveLoss", supports, impl)
