"""ContrastiveLoss with embedding-level Metrix (pairs "pos_neg" or "anchor_neg") on the
Triton engine: per anchor of a batch against itself, the sums and counts of its mixed
candidates' terms λ·[·]₊ and (1−λ)·[·]₊ over the closed-form candidates of metrix_tiles.py,

    L2 (normalised): d̃ = sqrt(max(2 − 2s̃, 0)), λ·[d̃ − m⁺]₊ and (1−λ)·[m⁻ − d̃]₊;
    cosine:          λ·[m⁺ − s̃]₊ and (1−λ)·[s̃ − m⁻]₊,

a term counting when it is > 0; the glue AvgNonZero-reduces each side over all candidates
(DESIGN §3), as the CPU op's glue does. The clean term is the clean Triton op's.

Coincident points: where 2 − 2s̃ is below 16 eps it is rounding noise, so d̃ = 0 with a zero
slope (common/contrastive_metrix.h, reference/metrix_soft_forms.py). The per-candidate
weight ∂L/∂s̃ = g⁺_a ∂term⁺/∂s̃ + g⁻_a ∂term⁻/∂s̃ goes through metrix_tiles' shared gradient
kernels; the terms are recomputed there, not stored."""
import torch

from ..ops.autograd import call, register_autograd
import triton
import triton.language as tl

from .. import fused
from ..distances import is_cosine, is_normalized_l2
from ..fused.contrastive import _avg_kept, _reduce_clean, _window
from ..fused.pair_counts import pair_count_tensors
from ..reducers import reduce_loss_dict
from ..spec import get_spec
from ..ops.unit_rows import unit_rows
from .contrastive import contrastive_rows_triton, supports as clean_supports
from .launch import triton_op
from .metrix_tiles import (candidate_tile, chunk_launch, chunk_rows, covers, mix_grads, pos_block,
                           run_sorted)
from .pairs import loss_constants


@triton.jit
def _con_mix_terms(v, ok, prm_ptr, COSINE: tl.constexpr):
    """Each candidate's two terms (label weights included, 0 off the candidates) and their
    slopes ∂/∂s̃."""
    lam, pos_m, neg_m = tl.load(prm_ptr), tl.load(prm_ptr + 1), tl.load(prm_ptr + 2)
    if COSINE:
        vp = pos_m - v
        vn = v - neg_m
        sp = tl.zeros_like(v) - lam
        sn = tl.zeros_like(v) + (1 - lam)
    else:
        q = tl.maximum(2.0 - 2.0 * v, 0.0)
        far = q >= tl.load(prm_ptr + 3)  # else coincident: d̃ = 0, no slope
        d = tl.where(far, tl.sqrt(q), 0.0)
        inv_d = tl.where(far, 1.0 / tl.where(far, d, 1.0), 0.0)
        vp = d - pos_m
        vn = neg_m - d
        sp = -lam * inv_d  # ∂d̃/∂s̃ = −1/d̃
        sn = (1 - lam) * inv_d
    kp = ok & (vp > 0)
    kn = ok & (vn > 0)
    tp = tl.where(kp, lam * vp, 0.0)
    tn = tl.where(kn, (1 - lam) * vn, 0.0)
    return tp, tn, tl.where(kp, sp, 0.0), tl.where(kn, sn, 0.0)


@triton.jit
def _con_mix_weights_l2(v, ok, g_pos, g_neg, _unused, prm_ptr):
    _, _, sp, sn = _con_mix_terms(v, ok, prm_ptr, False)
    return g_pos[:, None, None] * sp + g_neg[:, None, None] * sn


@triton.jit
def _con_mix_weights_cos(v, ok, g_pos, g_neg, _unused, prm_ptr):
    _, _, sp, sn = _con_mix_terms(v, ok, prm_ptr, True)
    return g_pos[:, None, None] * sp + g_neg[:, None, None] * sn


@triton.jit
def _sum2(t):
    return tl.sum(tl.sum(t, axis=2), axis=1)


@triton.jit
def _con_mix_fwd_kernel(x_ptr, lab_ptr, cnt_ptr, chunk_ptr, prm_ptr, ps_ptr, pc_ptr, ns_ptr,
                        nc_ptr, B, D, stride_x, COSINE: tl.constexpr, ANCHOR_NEG: tl.constexpr,
                        SPLIT: tl.constexpr, KB: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr):
    offs_k, a1, lab_k, cnt_k, p0, p1 = chunk_rows(chunk_ptr, tl.program_id(0), lab_ptr, cnt_ptr,
                                                  KB)
    lam = tl.load(prm_ptr)
    ps = tl.zeros((KB,), dtype=ACC)
    ns = tl.zeros((KB,), dtype=ACC)
    pc = tl.zeros((KB,), dtype=tl.int32)
    nc = tl.zeros((KB,), dtype=tl.int32)
    for p in range(p0, p1, KB):
        offs_p, lab_p, pm, sap = pos_block(x_ptr, lab_ptr, offs_k, a1, lab_k, cnt_k, p, p1, D,
                                       stride_x, ANCHOR_NEG, KB, BLOCK_D, ACC, PRECISION)
        for n0 in range(0, B, BLOCK_N):
            v, ok, r, offs_n, s_a, s_p, lab_n = candidate_tile(
                x_ptr, lab_ptr, offs_k, a1, lab_k, offs_p, p1, pm, sap, n0, B, D, stride_x, lam,
                SPLIT, KB, BLOCK_N, BLOCK_D, ACC, PRECISION)
            tp, tn, _, _ = _con_mix_terms(v, ok, prm_ptr, COSINE)
            ps += _sum2(tp)
            ns += _sum2(tn)
            pc += _sum2((tp > 0).to(tl.float32)).to(tl.int32)  # (tiles.count_true: why fp32)
            nc += _sum2((tn > 0).to(tl.float32)).to(tl.int32)
    row_ok = offs_k < a1
    tl.store(ps_ptr + offs_k, ps, mask=row_ok)
    tl.store(ns_ptr + offs_k, ns, mask=row_ok)
    tl.store(pc_ptr + offs_k, pc, mask=row_ok)
    tl.store(nc_ptr + offs_k, nc, mask=row_ok)


def _constants(x, pos_margin, neg_margin, lam):
    # λ first (metrix_tiles), the margins, and the coincidence bound on 2 − 2s̃ (16 eps)
    return loss_constants(x, lam, pos_margin, neg_margin, 16 * torch.finfo(x.dtype).eps)


_FWD = "metrix_ops::triton_contrastive_metrix"
_BWD = "metrix_ops::triton_contrastive_metrix_bwd"


@triton_op(_FWD, host_reads=True)
def _con_metrix_op(x: torch.Tensor, labels: torch.Tensor, cosine: bool, pos_margin: float,
                   neg_margin: float, lam: float, anchor_neg: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x = x.contiguous()
    b, d = x.shape
    ps, ns = (torch.zeros(b, dtype=x.dtype, device=x.device) for _ in range(2))
    pc, nc = (torch.zeros(b, dtype=torch.int32, device=x.device) for _ in range(2))
    if b > 0:
        table, counts, n_chunks, meta, _ = chunk_launch(x, labels, anchor_neg)
        _con_mix_fwd_kernel[(n_chunks,)](
            x, labels, counts, table, _constants(x, pos_margin, neg_margin, lam), ps, pc, ns,
            nc, b, d, x.stride(0), COSINE=bool(cosine), **meta)
    return ps, pc, ns, nc


@_con_metrix_op.register_fake
def _(x, labels, cosine, pos_margin, neg_margin, lam, anchor_neg):
    b = x.shape[0]
    return (x.new_empty(b), x.new_empty(b, dtype=torch.int32), x.new_empty(b),
            x.new_empty(b, dtype=torch.int32))


@triton_op(_BWD, host_reads=True)
def _con_metrix_bwd_op(g_pos: torch.Tensor, g_neg: torch.Tensor, x: torch.Tensor,
                       labels: torch.Tensor, cosine: bool, pos_margin: float,
                       neg_margin: float, lam: float, anchor_neg: bool) -> torch.Tensor:
    x = x.contiguous()
    weights = _con_mix_weights_cos if cosine else _con_mix_weights_l2
    return mix_grads(weights, x, labels, _constants(x, pos_margin, neg_margin, lam),
                     (g_pos, g_neg, g_pos), anchor_neg)


@_con_metrix_bwd_op.register_fake
def _(g_pos, g_neg, x, labels, cosine, pos_margin, neg_margin, lam, anchor_neg):
    return torch.empty_like(x)


def _setup(ctx, inputs, output):
    x, labels, *consts = inputs
    ctx.save_for_backward(x, labels)
    ctx.consts = tuple(consts)
    ctx.mark_non_differentiable(output[1], output[3])


def _backward(ctx, g_pos, _g_pc, g_neg, _g_nc):
    x = ctx.saved_tensors[0]
    # an output nobody used may come back as None
    g_pos, g_neg = (x.new_zeros(x.shape[0]) if g is None else g for g in (g_pos, g_neg))
    dx = torch.ops.metrix_ops.triton_contrastive_metrix_bwd(g_pos, g_neg, *ctx.saved_tensors,
                                                            *ctx.consts)
    return (dx,) + (None,) * 6


register_autograd(_FWD, _backward, setup_context=_setup)


def contrastive_metrix_rows_triton(x_unit, labels, cosine: bool, pos_margin: float,
                                   neg_margin: float, lam: float, pairs: str = "pos_neg"):
    """(pos_sum, pos_count, neg_sum, neg_count), each (B,) in the caller's order, of each
    anchor's mixed candidates' terms (kept when > 0); the sums are differentiable in x_unit.
    """
    return run_sorted(torch.ops.metrix_ops.triton_contrastive_metrix, x_unit, labels, pairs,
                      bool(cosine), float(pos_margin), float(neg_margin), float(lam))


def metrix_supports(params, inp, expansion, metrix) -> bool:
    """The clean op's calls on the distances this op mixes: normalised L2 or the cosine (not
    the squared forms, nor raw rows, which the clean op also takes)."""
    d = inp.distance
    return ((is_normalized_l2(d) or is_cosine(d))
            and covers(clean_supports, params, inp, expansion, metrix))


def metrix_impl(params, inp, reducer, metrix, lam: float):
    """L(clean) + weight · L̃: the clean rows reduced as the clean Triton glue does; the mixed
    term AvgNonZero-reduces its positive and negative terms apart over all candidates of all
    anchors, then sums them, whatever the clean loss's reducer (as the CPU op's glue)."""
    x = inp.embeddings
    window = _window(reducer)
    if window is None:  # a reducer that is not a ratio of totals: the reference, both terms
        from ..reference.metrix import metrix_loss
        clean = reduce_loss_dict(get_spec("ContrastiveLoss").loss_dict(inp, **params), reducer, x)
        return clean + metrix.weight * metrix_loss("ContrastiveLoss", params, inp, metrix, lam)
    cosine = is_cosine(inp.distance)
    pm, nm = params["pos_margin"], params["neg_margin"]
    xu = unit_rows(x)
    low, high = window
    clean = contrastive_rows_triton(xu, xu, inp.labels, inp.labels, True, cosine, pm, nm,
                                    low, high)
    n_pos, n_neg = pair_count_tensors(inp.labels, inp.ref_labels, inp.same_set)
    ps, pc, ns, nc = contrastive_metrix_rows_triton(xu, inp.labels, cosine, pm, nm, lam,
                                                    metrix.pairs)
    mixed = _avg_kept(ps, pc, x) + _avg_kept(ns, nc, x)
    return _reduce_clean(clean, n_pos, n_neg, reducer, x) + metrix.weight * mixed


fused.register_metrix("triton", "ContrastiveLoss", metrix_supports, metrix_impl)
