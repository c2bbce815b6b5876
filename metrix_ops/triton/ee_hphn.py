"""HPHNTripletLoss with Embedding Expansion on the Triton engine: the hard-negative-pair
mining of DESIGN §4 by one streaming kernel over the points, without gradient; the chosen
distances are then recomputed with gradient by the CPU path's glue (fused/hphn_triplet.py),
so both engines share one loss given the same picks.

Points (reference/expansion_points.py): the B originals, then n synthetic points per segment
(segment-major, k = 1..n), each an index triple (u, w, λ) into the unit rows: never
materialised. The kernel takes rows of points against column tiles of points and forms
their inner products in closed form from four gathered Gram tiles, in the reference's
association (⟨p, q⟩ = λ_p H_{u_p q} + (1−λ_p) H_{w_p q}, H_{b q} = λ_q G_{b u_q} + (1−λ_q)
G_{b w_q}, then / (‖p‖‖q‖)), and keeps per row point its closest point of another class in
the loss's metric (cosine, or √(2 − 2s) with cdist's 0 below 16 eps), ties to the lowest
column. Then per anchor i, over its side A_i (x_i and the points on its segments): the
closest of those, ties to the lowest negative point and then the earliest a in A_i — the
reference's order (q-major: d̂(i, q) = min over A_i, then the lowest q).

Work: four products per tile over the (B + n·#segments)² point pairs, with no pruning (the
CPU op skips classes and arcs on bounds); memory O(P) index tables beside X, no P×D stack."""
import torch
import triton
import triton.language as tl

from .. import fused
from ..distances import is_cosine, is_normalized_l2
from ..fused.ee_hphn_picks import ee_hphn_picks
from ..fused.hphn_triplet import picks_loss, segments_for
from ..ops.unit_rows import normalized
from .hphn_triplet import hphn_mine_triton
from .launch import usable_on
from .pairs import launch_config, loss_constants, max_dim
from .tiles import sim_tile


@triton.jit
def _ee_mine_kernel(x_ptr, pu_ptr, pw_ptr, plam_ptr, pscale_ptr, plab_ptr, prm_ptr, best_ptr,
                    col_ptr, B, P, D, stride_x, INVERTED: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
                    PRECISION: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < P
    u_m = tl.load(pu_ptr + offs_m, mask=row_ok, other=0)
    w_m = tl.load(pw_ptr + offs_m, mask=row_ok, other=0)
    lam_m = tl.load(plam_ptr + offs_m, mask=row_ok, other=1.0).to(ACC)
    sc_m = tl.load(pscale_ptr + offs_m, mask=row_ok, other=1.0).to(ACC)
    lab_m = tl.load(plab_ptr + offs_m, mask=row_ok, other=0)
    tiny, eps = tl.load(prm_ptr), tl.load(prm_ptr + 1)
    if INVERTED:
        best = tl.full((BLOCK_M,), float("-inf"), ACC)
    else:
        best = tl.full((BLOCK_M,), float("inf"), ACC)
    bcol = tl.zeros((BLOCK_M,), tl.int32) + P
    for n0 in range(0, P, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        col_ok = offs_n < P
        u_n = tl.load(pu_ptr + offs_n, mask=col_ok, other=0)
        w_n = tl.load(pw_ptr + offs_n, mask=col_ok, other=0)
        lam_n = tl.load(plam_ptr + offs_n, mask=col_ok, other=1.0).to(ACC)
        sc_n = tl.load(pscale_ptr + offs_n, mask=col_ok, other=1.0).to(ACC)
        lab_n = tl.load(plab_ptr + offs_n, mask=col_ok, other=0)
        g_uu = sim_tile(x_ptr, x_ptr, u_m, u_n, B, B, D, stride_x, stride_x, BLOCK_M, BLOCK_N,
                        BLOCK_D, ACC, PRECISION)
        g_uw = sim_tile(x_ptr, x_ptr, u_m, w_n, B, B, D, stride_x, stride_x, BLOCK_M, BLOCK_N,
                        BLOCK_D, ACC, PRECISION)
        g_wu = sim_tile(x_ptr, x_ptr, w_m, u_n, B, B, D, stride_x, stride_x, BLOCK_M, BLOCK_N,
                        BLOCK_D, ACC, PRECISION)
        g_ww = sim_tile(x_ptr, x_ptr, w_m, w_n, B, B, D, stride_x, stride_x, BLOCK_M, BLOCK_N,
                        BLOCK_D, ACC, PRECISION)
        h_u = lam_n[None, :] * g_uu + (1 - lam_n[None, :]) * g_uw
        h_w = lam_n[None, :] * g_wu + (1 - lam_n[None, :]) * g_ww
        s = (lam_m[:, None] * h_u + (1 - lam_m[:, None]) * h_w) / (sc_m[:, None] * sc_n[None, :])
        neg = row_ok[:, None] & col_ok[None, :] & (lab_m[:, None] != lab_n[None, :])
        cols = offs_n[None, :].to(tl.int32)
        if INVERTED:
            m = tl.where(neg, s, float("-inf"))
            tb = tl.max(m, axis=1)
        else:
            d2 = 2.0 - 2.0 * s
            m = tl.where(d2 < tiny, 0.0, tl.sqrt(tl.maximum(d2, eps)))
            m = tl.where(neg, m, float("inf"))
            tb = tl.min(m, axis=1)
        targ = tl.min(tl.where(neg & (m == tb[:, None]), cols, P), axis=1)
        if INVERTED:
            closer = tb > best
        else:
            closer = tb < best
        better = (targ < P) & (closer | (bcol == P))
        bcol = tl.where(better, targ, bcol)
        best = tl.where(better, tb, best)
    tl.store(best_ptr + offs_m, best, mask=row_ok)
    tl.store(col_ptr + offs_m, tl.where(bcol < P, bcol, -1).to(tl.int64), mask=row_ok)


def mine_config(x):
    """The mining kernel's tiles and warps. On a GPU four product tiles live at once: 64×64
    tiles spill 1–2 KB per thread on sm_90, 32×32 with 32-wide feature steps and 4 warps 88
    bytes (ptxas -v, benchmarks/triton_spills.py)."""
    cfg, _, warps = launch_config(x, x)
    if x.device.type == "cuda":
        cfg.update(BLOCK_M=32, BLOCK_N=32, BLOCK_D=32)
        warps = dict(warps, num_warps=4)
    return cfg, warps


@torch.library.custom_op("metrix_ops::triton_ee_point_mine", mutates_args=())
def _ee_point_mine_op(x: torch.Tensor, pu: torch.Tensor, pw: torch.Tensor, plam: torch.Tensor,
                      pscale: torch.Tensor, plab: torch.Tensor, inverted: bool
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.contiguous()
    p = pu.shape[0]
    best = torch.empty(p, dtype=x.dtype, device=x.device)
    col = torch.empty(p, dtype=torch.long, device=x.device)
    if p == 0:
        return best, col
    eps = torch.finfo(x.dtype).eps
    cfg, warps = mine_config(x)
    _ee_mine_kernel[(triton.cdiv(p, cfg["BLOCK_M"]),)](
        x, pu.contiguous(), pw.contiguous(), plam.contiguous(), pscale.contiguous(),
        plab.contiguous(), loss_constants(x, 16 * eps, eps), best, col, x.shape[0], p,
        x.shape[1], x.stride(0), INVERTED=bool(inverted), **cfg, **warps)
    return best, col


@_ee_point_mine_op.register_fake
def _(x, pu, pw, plam, pscale, plab, inverted):
    return x.new_empty(pu.shape[0]), pu.new_empty(pu.shape[0])


def ee_hphn_mine_triton(x_unit, labels, seg_i, seg_j, n_points: int,
                        inverted: bool) -> torch.Tensor:
    """B × 7 int64 picks per anchor, as the CPU op ops.ee_mining.ee_hphn_mine
    (fused/ee_hphn_picks.py), from this engine's point mining kernel."""
    def point_mine(x, pts, lam, scale):
        return torch.ops.metrix_ops.triton_ee_point_mine(x, pts.u, pts.w, lam, scale, pts.labels,
                                                         bool(inverted))

    def farthest_positive(x, labels):
        return hphn_mine_triton(x, x, labels, labels, True)[:, 0]
    return ee_hphn_picks(x_unit, labels, seg_i, seg_j, n_points, inverted, point_mine,
                         farthest_positive)


def supports(params, inp, expansion) -> bool:
    x, d = inp.embeddings, inp.distance
    return (expansion is not None and inp.indices_tuple is None and inp.labels is not None
            and inp.same_set and inp.ref_emb is x and (is_cosine(d) or is_normalized_l2(d))
            and (expansion.normalize or expansion.n_points == 0 or is_cosine(d))
            and x.shape[1] <= max_dim(x.dtype) and usable_on(x.device))


def impl(params, inp, reducer, expansion):
    labels, d = inp.labels.long(), inp.distance
    xu = normalized(d, inp.embeddings)
    seg_i, seg_j = segments_for(labels, expansion)
    idx = ee_hphn_mine_triton(xu, labels, seg_i, seg_j, expansion.n_points, d.is_inverted)
    return picks_loss(params, inp, reducer, xu, idx, expansion.n_points)


fused.register_expansion("triton", "HPHNTripletLoss", supports, impl)
