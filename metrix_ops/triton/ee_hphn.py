"""HPHNTripletLoss with Embedding Expansion on the Triton engine: the hard-negative-pair
mining of DESIGN §4 by one streaming kernel over the points, without gradient; the chosen
distances are then recomputed with gradient by the CPU path's glue (fused/hphn_triplet.py),
so both engines share one loss given the same picks.

Points (reference/expansion_points.py): the B originals, then n synthetic points per segment
(segment-major, k = 1..n), each (u, w, λ) into the unit rows: never materialised. Per point
the kernel keeps its closest point of another class in the loss's metric (cosine, or
√(2 − 2s) with cdist's 0 below 16 eps), ties to the lowest column; then per anchor i, over
its side A_i (x_i and the points on its segments): the closest of those, ties to the lowest
negative point and then the earliest a in A_i — the reference's order (q-major: d̂(i, q) =
min over A_i, then the lowest q).

Tiles are of *units*, not points: a unit is an original (one point, u = w) or a segment (its
n points share u and w). A program takes BR row units against column tiles of units; per
tile pair the four Gram tiles G[u_r, u_c], G[u_r, w_c], G[w_r, u_c], G[w_r, w_c] (tl.dot of
gathered rows; two for an original side, one for two) give every point pair of the tile in
closed form, in the reference's association (⟨p, q⟩ = λ_p H_{u_p q} + (1−λ_p) H_{w_p q},
H_{b q} = λ_q G_{b u_q} + (1−λ_q) G_{b w_q}, then / (‖p‖‖q‖)): the row points of a unit
along a second axis (NPR of them, n rounded up to a power of two and at most MAX_NPR; a
larger n takes groups of points along the grid's second axis), the column points one k at
a time. So the products are per unit pair, not per point pair: n² fewer than a point-pair
tiling (64× at n = 8), and the point pairs cost a few FMAs each.

Work: 4·(B + S)²·D multiply-adds for S segments (B + S units), and (B + n·S)² point pairs;
no pruning (the CPU op skips classes and arcs on bounds); memory O(P) beside X."""
import torch
import triton
import triton.language as tl

from .. import fused
from ..distances import is_cosine, is_normalized_l2
from ..fused.ee_hphn_picks import ee_hphn_picks
from ..fused.hphn_triplet import picks_loss, segments_for
from ..ops.unit_rows import normalized
from .hphn_triplet import hphn_mine_triton
from .launch import next_pow2, triton_op, usable_on
from .ee_chunks import check_segment_labels
from .pairs import launch_config, loss_constants, max_dim
from .tiles import sim_tile


@triton.jit
def _fold_points(best, bcol, s, neg, cols, P, tiny, eps, INVERTED: tl.constexpr):
    """Each row point's (best, column) updated by a (row units × NPR × columns) tile of inner
    products s: the closest column of another class (neg), ties to the lowest column, so
    the result does not depend on the order tiles come in."""
    if INVERTED:
        m = tl.where(neg, s, float("-inf"))
        tb = tl.max(m, axis=2)
    else:
        d2 = 2.0 - 2.0 * s
        m = tl.where(d2 < tiny, 0.0, tl.sqrt(tl.maximum(d2, eps)))
        m = tl.where(neg, m, float("inf"))
        tb = tl.min(m, axis=2)
    targ = tl.min(tl.where(neg & (m == tb[:, :, None]), cols, P), axis=2)
    if INVERTED:
        closer = tb > best
    else:
        closer = tb < best
    better = (targ < P) & (closer | (bcol == P) | ((tb == best) & (targ < bcol)))
    return tl.where(better, tb, best), tl.where(better, targ, bcol)


@triton.jit
def _point_sims(lam_r, sc_r, h_u, h_w, sc_c):
    """⟨p, q⟩/(‖p‖‖q‖) for row points (units × NPR: λ_p, ‖p‖) against columns (H_u, H_w per
    row unit and column, ‖q‖ per column)."""
    return ((lam_r[:, :, None] * h_u[:, None, :] + (1 - lam_r[:, :, None]) * h_w[:, None, :])
            / (sc_r[:, :, None] * sc_c[None, None, :]))


@triton.jit
def _ee_mine_kernel(x_ptr, lab_ptr, si_ptr, sj_ptr, plam_ptr, pscale_ptr, prm_ptr, best_ptr,
                    col_ptr, B, S, n, D, stride_x, ROW_SEG: tl.constexpr,
                    INVERTED: tl.constexpr, BR: tl.constexpr, NPR: tl.constexpr,
                    BCO: tl.constexpr, BCS: tl.constexpr, BLOCK_D: tl.constexpr,
                    ACC: tl.constexpr, PRECISION: tl.constexpr):
    """BR row units (originals, or segments with ROW_SEG: NPR of their points, the group
    program_id(1)) against every unit: each row point's closest point of another class."""
    P = B + S * n
    offs_r = tl.program_id(0) * BR + tl.arange(0, BR)
    k = tl.program_id(1) * NPR + tl.arange(0, NPR)  # a group of each segment's points
    if ROW_SEG:
        row_ok = offs_r < S
        u_r = tl.load(si_ptr + offs_r, mask=row_ok, other=0)
        w_r = tl.load(sj_ptr + offs_r, mask=row_ok, other=0)
        pt_ok = row_ok[:, None] & (k[None, :] < n)
        p_r = B + offs_r[:, None] * n + k[None, :]
    else:  # NPR = 1: the original itself
        row_ok = offs_r < B
        u_r = offs_r
        w_r = offs_r
        pt_ok = row_ok[:, None] & (k[None, :] == 0)
        p_r = offs_r[:, None] + k[None, :]
    lab_r = tl.load(lab_ptr + u_r, mask=row_ok, other=0)
    lam_r = tl.load(plam_ptr + p_r, mask=pt_ok, other=1.0).to(ACC)
    sc_r = tl.load(pscale_ptr + p_r, mask=pt_ok, other=1.0).to(ACC)
    tiny, eps = tl.load(prm_ptr), tl.load(prm_ptr + 1)
    if INVERTED:
        best = tl.full((BR, NPR), float("-inf"), ACC)
    else:
        best = tl.full((BR, NPR), float("inf"), ACC)
    bcol = tl.zeros((BR, NPR), tl.int32) + P
    # columns: the originals (λ = 1, u = w: H_u = G[u_r, c], H_w = G[w_r, c])
    for c0 in range(0, B, BCO):
        offs_c = c0 + tl.arange(0, BCO)
        c_ok = offs_c < B
        lab_c = tl.load(lab_ptr + offs_c, mask=c_ok, other=0)
        sc_c = tl.load(pscale_ptr + offs_c, mask=c_ok, other=1.0).to(ACC)
        g_u = sim_tile(x_ptr, x_ptr, u_r, offs_c, B, B, D, stride_x, stride_x, BR, BCO,
                       BLOCK_D, ACC, PRECISION)
        if ROW_SEG:
            g_w = sim_tile(x_ptr, x_ptr, w_r, offs_c, B, B, D, stride_x, stride_x, BR, BCO,
                           BLOCK_D, ACC, PRECISION)
        else:
            g_w = g_u
        neg = pt_ok[:, :, None] & (c_ok & (lab_r[:, None] != lab_c[None, :]))[:, None, :]
        best, bcol = _fold_points(best, bcol, _point_sims(lam_r, sc_r, g_u, g_w, sc_c), neg,
                                  offs_c[None, None, :], P, tiny, eps, INVERTED)
    # columns: the segments, their n points one k at a time
    for c0 in range(0, S, BCS):
        offs_c = c0 + tl.arange(0, BCS)
        c_ok = offs_c < S
        u_c = tl.load(si_ptr + offs_c, mask=c_ok, other=0)
        w_c = tl.load(sj_ptr + offs_c, mask=c_ok, other=0)
        lab_c = tl.load(lab_ptr + u_c, mask=c_ok, other=0)
        g_uu = sim_tile(x_ptr, x_ptr, u_r, u_c, B, B, D, stride_x, stride_x, BR, BCS,
                        BLOCK_D, ACC, PRECISION)
        g_uw = sim_tile(x_ptr, x_ptr, u_r, w_c, B, B, D, stride_x, stride_x, BR, BCS,
                        BLOCK_D, ACC, PRECISION)
        if ROW_SEG:
            g_wu = sim_tile(x_ptr, x_ptr, w_r, u_c, B, B, D, stride_x, stride_x, BR, BCS,
                            BLOCK_D, ACC, PRECISION)
            g_ww = sim_tile(x_ptr, x_ptr, w_r, w_c, B, B, D, stride_x, stride_x, BR, BCS,
                            BLOCK_D, ACC, PRECISION)
        else:
            g_wu = g_uu
            g_ww = g_uw
        neg = pt_ok[:, :, None] & (c_ok & (lab_r[:, None] != lab_c[None, :]))[:, None, :]
        for l in range(0, n):
            p_c = B + offs_c * n + l
            lam_c = tl.load(plam_ptr + p_c, mask=c_ok, other=1.0).to(ACC)[None, :]
            sc_c = tl.load(pscale_ptr + p_c, mask=c_ok, other=1.0).to(ACC)
            h_u = lam_c * g_uu + (1 - lam_c) * g_uw
            h_w = lam_c * g_wu + (1 - lam_c) * g_ww
            best, bcol = _fold_points(best, bcol, _point_sims(lam_r, sc_r, h_u, h_w, sc_c),
                                      neg, p_c[None, None, :], P, tiny, eps, INVERTED)
    tl.store(best_ptr + p_r, best, mask=pt_ok)
    tl.store(col_ptr + p_r, tl.where(bcol < P, bcol, -1).to(tl.int64), mask=pt_ok)


def mine_config(x):
    """(rows of originals, rows of segments, original and segment columns per tile; the
    launch settings shared by both row kinds; warps for original rows, for segment rows).
    The interpreter runs one numpy program per tile, so there the tiles are as large as the
    batch allows. On a GPU (ptxas -v for sm_90, benchmarks/triton_spills.py, fp32): original
    rows 32 × 32 on 4 warps, 222 registers, no spills; segment rows (four 16 × 16 Gram tiles
    and a 16 × NPR × 16 tile of point pairs) 234 registers and no spills on 8 warps at NPR = 8
    (n ≤ 8), 36 B of spills at NPR = 16; on 4 warps 56 and 360 B."""
    cfg, _, warps = launch_config(x, x)
    del cfg["BLOCK_M"], cfg["BLOCK_N"]
    if x.device.type != "cuda":
        return dict(BRO=64, BRS=32, BCO=64, BCS=32), cfg, warps, warps
    cfg.update(BLOCK_D=32)
    return (dict(BRO=32, BRS=16, BCO=32, BCS=16), cfg, dict(warps, num_warps=4),
            dict(warps, num_warps=8))


# a segment's points per row program at most (a group of them; more points take more groups
# along the grid's second axis): the 16 × NPR × 16 tile spills past 8 on sm_90 (mine_config)
MAX_NPR = 8


def _check_tables(x, labels, seg_i, seg_j, n, plam, pscale):
    """The op's tables fit x (a bad one would read out of bounds in the kernel), and each
    segment's ends share a label (ee_chunks.check_segment_labels), n = 0 included."""
    b, s = x.shape[0], (seg_i.shape[0] if n > 0 else 0)
    p = b + s * n
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if labels.shape != (b,):
        raise ValueError(f"labels must have shape ({b},), got {tuple(labels.shape)}")
    if seg_i.shape != seg_j.shape or seg_i.dim() != 1:
        raise ValueError(f"seg_i and seg_j must be 1-D of one length, got {tuple(seg_i.shape)} "
                         f"and {tuple(seg_j.shape)}")
    for name, t in (("plam", plam), ("pscale", pscale)):
        if t.shape != (p,):
            raise ValueError(f"{name} must have shape ({p},) (B + n·S points), got "
                             f"{tuple(t.shape)}")
    check_segment_labels(labels, seg_i, seg_j)


@triton_op("metrix_ops::triton_ee_point_mine", host_reads=True)
def _ee_point_mine_op(x: torch.Tensor, labels: torch.Tensor, seg_i: torch.Tensor,
                      seg_j: torch.Tensor, n: int, plam: torch.Tensor, pscale: torch.Tensor,
                      inverted: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per point of the expansion (B originals, then n per segment (seg_i, seg_j), λ and
    norm per point) its closest point of another class and that distance (or similarity
    when inverted); column −1 where every point shares its class."""
    x = x.contiguous()
    b, s = x.shape[0], (seg_i.shape[0] if n > 0 else 0)
    p = b + s * n
    _check_tables(x, labels, seg_i, seg_j, n, plam, pscale)
    best = torch.empty(p, dtype=x.dtype, device=x.device)
    col = torch.empty(p, dtype=torch.long, device=x.device)
    if p == 0:
        return best, col
    eps = torch.finfo(x.dtype).eps
    units, cfg, warps_o, warps_s = mine_config(x)
    args = (x, labels.contiguous(), seg_i.contiguous(), seg_j.contiguous(), plam.contiguous(),
            pscale.contiguous(), loss_constants(x, 16 * eps, eps), best, col, b, s, n,
            x.shape[1], x.stride(0))
    common = dict(INVERTED=bool(inverted), BCO=units["BCO"], BCS=units["BCS"], **cfg)
    _ee_mine_kernel[(triton.cdiv(b, units["BRO"]), 1)](*args, ROW_SEG=False, BR=units["BRO"],
                                                        NPR=1, **common, **warps_o)
    if s > 0:
        npr = min(next_pow2(n), MAX_NPR)
        _ee_mine_kernel[(triton.cdiv(s, units["BRS"]), triton.cdiv(n, npr))](
            *args, ROW_SEG=True, BR=units["BRS"], NPR=npr, **common, **warps_s)
    return best, col


@_ee_point_mine_op.register_fake
def _(x, labels, seg_i, seg_j, n, plam, pscale, inverted):
    p = x.shape[0] + (seg_i.shape[0] if n > 0 else 0) * n
    return x.new_empty(p), x.new_empty(p, dtype=torch.long)


def ee_hphn_mine_triton(x_unit, labels, seg_i, seg_j, n_points: int,
                        inverted: bool) -> torch.Tensor:
    """B × 7 int64 picks per anchor, as the CPU op ops.ee_mining.ee_hphn_mine
    (fused/ee_hphn_picks.py), from this engine's point mining kernel."""
    def point_mine(x, pts, lam, scale):
        return torch.ops.metrix_ops.triton_ee_point_mine(
            x, pts.labels[:pts.b], pts.seg_i, pts.seg_j, pts.n, lam, scale, bool(inverted))

    def farthest_positive(x, labels):
        return hphn_mine_triton(x, x, labels, labels, True)[:, 0]
    return ee_hphn_picks(x_unit, labels, seg_i, seg_j, n_points, inverted, point_mine,
                         farthest_positive)


def supports(params, inp, expansion) -> bool:
    x, d = inp.embeddings, inp.distance
    return (expansion is not None and inp.indices_tuple is None and inp.labels is not None
            and inp.same_set and inp.ref_emb is x and (is_cosine(d) or is_normalized_l2(d))
            and (expansion.normalize or expansion.n_points == 0 or is_cosine(d))
            and x.shape[1] <= max_dim(x.dtype) and usable_on(x.device, x.dtype))


def impl(params, inp, reducer, expansion):
    labels, d = inp.labels.long(), inp.distance
    xu = normalized(d, inp.embeddings)
    seg_i, seg_j = segments_for(labels, expansion)
    idx = ee_hphn_mine_triton(xu, labels, seg_i, seg_j, expansion.n_points, d.is_inverted)
    return picks_loss(params, inp, reducer, xu, idx, expansion.n_points, triton=True)


fused.register_expansion("triton", "HPHNTripletLoss", supports, impl)
