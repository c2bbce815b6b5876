"""The pieces every pair loss of the Triton engine shares (MultiSimilarityLoss,
ContrastiveLoss, ...): the gradient kernels that turn a loss's G tile into dX = G R,
dR = Gᵀ X or, for the batch against itself, (G + Gᵀ) X; their launcher pair_grads; the
tile sizes of a launch (launch_config, max_dim); the loss constants as a tensor; and the
custom-op helpers for gradients that are not needed (needs_grads, grads_or_empty,
fake_grads) and for the symmetric case (is_symmetric)."""
import os

import torch
import triton
import triton.language as tl

from .launch import next_pow2, row_block, dim_block
from .tiles import (acc_dtype, add_tile_product, dot_precision, minus_radial, pair_masks,
                    raw_table, raw_unit_sims, sim_tile)


# ---- the gradient kernels every pair loss of this engine shares ----
# GRAD_TILE(s, pos, neg, a, b, c, prm_ptr) is a @triton.jit function (a constexpr argument)
# that turns a recomputed tile of S into its tile of G = ∂L/∂S, from three per-anchor-row
# vectors a, b, c (the row statistics the loss saved, and its row weights) and the loss's
# constants at prm_ptr. G_ij depends on row i's statistics only, which is what lets dR be
# computed by column programs without atomics.


@triton.jit
def mined_masks(s, pos, neg, offs, ok, hn_ptr, hp_ptr, eps_ptr):
    """The pairs MultiSimilarityMiner(ε) keeps of a tile whose rows are `offs`: a positive
    when s − ε < the row's hardest negative, a negative when s + ε > its hardest positive
    (PML's comparisons as PML writes them; thresholds from ms_mined.py's bounds kernel)."""
    hn = tl.load(hn_ptr + offs, mask=ok, other=0.0).to(s.dtype)
    hp = tl.load(hp_ptr + offs, mask=ok, other=0.0).to(s.dtype)
    eps = tl.load(eps_ptr).to(s.dtype)
    return pos & (s - eps < hn[:, None]), neg & (s + eps > hp[:, None])


@triton.jit
def pair_grad_dx_kernel(x_ptr, r_ptr, lab_ptr, rlab_ptr, prm_ptr, a_ptr, b_ptr, c_ptr, dx_ptr,
                        hn_ptr, hp_ptr, eps_ptr, raw_ptr, B, M, D, stride_x, stride_r,
                        stride_dx, GRAD_TILE: tl.constexpr, EXCLUDE_DIAG: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_DO: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                        MINE: tl.constexpr = False, RAW: tl.constexpr = False):
    """dX = G R: one program per BLOCK_M anchor rows, streaming the reference tiles. MINE:
    only the pairs MultiSimilarityMiner keeps (mined_masks). RAW: rows of any norm, read as
    unit rows at their L2 distances (tiles.raw_unit_sims; raw_ptr: raw_table), and the
    gradient's radial part, −(Σ_j G_ij)·x_i (tiles.minus_radial)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < B
    lab_m = tl.load(lab_ptr + offs_m, mask=row_ok, other=0)
    a = tl.load(a_ptr + offs_m, mask=row_ok, other=0.0).to(ACC)
    b = tl.load(b_ptr + offs_m, mask=row_ok, other=0.0).to(ACC)
    c = tl.load(c_ptr + offs_m, mask=row_ok, other=0.0).to(ACC)
    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=ACC)
    gsum = tl.zeros((BLOCK_M,), dtype=ACC)
    for n0 in range(0, M, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        lab_n = tl.load(rlab_ptr + offs_n, mask=offs_n < M, other=0)
        s = sim_tile(x_ptr, r_ptr, offs_m, offs_n, B, M, D, stride_x, stride_r,
                     BLOCK_M, BLOCK_N, BLOCK_D, ACC, PRECISION)
        if RAW:
            s = raw_unit_sims(s, raw_ptr, offs_m, offs_n, B, M)
        pos, neg = pair_masks(offs_m, offs_n, lab_m, lab_n, B, M, EXCLUDE_DIAG)
        if MINE:
            pos, neg = mined_masks(s, pos, neg, offs_m, row_ok, hn_ptr, hp_ptr, eps_ptr)
        gt = GRAD_TILE(s, pos, neg, a, b, c, prm_ptr)
        acc = add_tile_product(acc, gt, r_ptr, offs_n, M, D, stride_r, BLOCK_DO, PRECISION)
        if RAW:  # the tile as the product took it (rounded to the rows' dtype)
            gsum += tl.sum(gt.to(r_ptr.dtype.element_ty).to(ACC), 1)
    if RAW:
        acc = minus_radial(acc, gsum, x_ptr, offs_m, B, D, stride_x, BLOCK_DO, ACC)
    offs_d = tl.arange(0, BLOCK_DO)
    tl.store(dx_ptr + offs_m[:, None] * stride_dx + offs_d[None, :], acc,
             mask=row_ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def pair_grad_dr_kernel(x_ptr, r_ptr, lab_ptr, rlab_ptr, prm_ptr, a_ptr, b_ptr, c_ptr, dr_ptr,
                        hn_ptr, hp_ptr, eps_ptr, raw_ptr, B, M, D, stride_x, stride_r,
                        stride_dr, GRAD_TILE: tl.constexpr, EXCLUDE_DIAG: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_DO: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                        MINE: tl.constexpr = False, RAW: tl.constexpr = False):
    """dR = Gᵀ X: one program per BLOCK_N reference rows, streaming the anchor tiles (with
    each tile, its rows' statistics). RAW: as the dX kernel, less (Σ_i G_ij)·r_j."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < M
    lab_n = tl.load(rlab_ptr + offs_n, mask=col_ok, other=0)
    acc = tl.zeros((BLOCK_N, BLOCK_DO), dtype=ACC)
    gsum = tl.zeros((BLOCK_N,), dtype=ACC)
    for m0 in range(0, B, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < B
        lab_m = tl.load(lab_ptr + offs_m, mask=row_ok, other=0)
        a = tl.load(a_ptr + offs_m, mask=row_ok, other=0.0).to(ACC)
        b = tl.load(b_ptr + offs_m, mask=row_ok, other=0.0).to(ACC)
        c = tl.load(c_ptr + offs_m, mask=row_ok, other=0.0).to(ACC)
        s = sim_tile(x_ptr, r_ptr, offs_m, offs_n, B, M, D, stride_x, stride_r,
                     BLOCK_M, BLOCK_N, BLOCK_D, ACC, PRECISION)
        if RAW:
            s = raw_unit_sims(s, raw_ptr, offs_m, offs_n, B, M)
        pos, neg = pair_masks(offs_m, offs_n, lab_m, lab_n, B, M, EXCLUDE_DIAG)
        if MINE:
            pos, neg = mined_masks(s, pos, neg, offs_m, row_ok, hn_ptr, hp_ptr, eps_ptr)
        gt = GRAD_TILE(s, pos, neg, a, b, c, prm_ptr)
        acc = add_tile_product(acc, tl.trans(gt), x_ptr, offs_m, B, D, stride_x, BLOCK_DO,
                               PRECISION)
        if RAW:  # the tile as the product took it (rounded to the rows' dtype)
            gsum += tl.sum(gt.to(x_ptr.dtype.element_ty).to(ACC), 0)
    if RAW:
        acc = minus_radial(acc, gsum, r_ptr, offs_n, M, D, stride_r, BLOCK_DO, ACC)
    offs_d = tl.arange(0, BLOCK_DO)
    tl.store(dr_ptr + offs_n[:, None] * stride_dr + offs_d[None, :], acc,
             mask=col_ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def pair_grad_sym_kernel(x_ptr, lab_ptr, prm_ptr, a_ptr, b_ptr, c_ptr, dx_ptr, hn_ptr, hp_ptr,
                         eps_ptr, raw_ptr, B, D, stride_x, stride_dx, GRAD_TILE: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_DO: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                         MINE: tl.constexpr = False, RAW: tl.constexpr = False):
    """The batch against itself (R = X, self pairs excluded): S is symmetric, so the whole
    gradient of X is (G + Gᵀ) X, and the tile (I, J) of Gᵀ is G_JI, computed from the same
    s_ij with the statistics of rows J. One kernel of row programs, 2 products per tile (S
    and H X) instead of the general path's 4 (S, G R; S, Gᵀ X). RAW: as the dX kernel, with
    H for G (its radial part −(Σ_j H_ij)·x_i)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < B
    lab_m = tl.load(lab_ptr + offs_m, mask=row_ok, other=0)
    a = tl.load(a_ptr + offs_m, mask=row_ok, other=0.0).to(ACC)
    b = tl.load(b_ptr + offs_m, mask=row_ok, other=0.0).to(ACC)
    c = tl.load(c_ptr + offs_m, mask=row_ok, other=0.0).to(ACC)
    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=ACC)
    gsum = tl.zeros((BLOCK_M,), dtype=ACC)
    for n0 in range(0, B, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        col_ok = offs_n < B
        lab_n = tl.load(lab_ptr + offs_n, mask=col_ok, other=0)
        a_n = tl.load(a_ptr + offs_n, mask=col_ok, other=0.0).to(ACC)
        b_n = tl.load(b_ptr + offs_n, mask=col_ok, other=0.0).to(ACC)
        c_n = tl.load(c_ptr + offs_n, mask=col_ok, other=0.0).to(ACC)
        s = sim_tile(x_ptr, x_ptr, offs_m, offs_n, B, B, D, stride_x, stride_x,
                     BLOCK_M, BLOCK_N, BLOCK_D, ACC, PRECISION)
        if RAW:
            s = raw_unit_sims(s, raw_ptr, offs_m, offs_n, B, B)
        pos, neg = pair_masks(offs_m, offs_n, lab_m, lab_n, B, B, True)
        pos_t, neg_t = pair_masks(offs_n, offs_m, lab_n, lab_m, B, B, True)
        s_t = tl.trans(s)
        if MINE:  # each side's pairs by its own rows' thresholds
            pos, neg = mined_masks(s, pos, neg, offs_m, row_ok, hn_ptr, hp_ptr, eps_ptr)
            pos_t, neg_t = mined_masks(s_t, pos_t, neg_t, offs_n, col_ok, hn_ptr, hp_ptr,
                                       eps_ptr)
        h = GRAD_TILE(s, pos, neg, a, b, c, prm_ptr)
        h += tl.trans(GRAD_TILE(s_t, pos_t, neg_t, a_n, b_n, c_n, prm_ptr))
        acc = add_tile_product(acc, h, x_ptr, offs_n, B, D, stride_x, BLOCK_DO, PRECISION)
        if RAW:  # the tile as the product took it (rounded to the rows' dtype)
            gsum += tl.sum(h.to(x_ptr.dtype.element_ty).to(ACC), 1)
    if RAW:
        acc = minus_radial(acc, gsum, x_ptr, offs_m, B, D, stride_x, BLOCK_DO, ACC)
    offs_d = tl.arange(0, BLOCK_DO)
    tl.store(dx_ptr + offs_m[:, None] * stride_dx + offs_d[None, :], acc,
             mask=row_ok[:, None] & (offs_d[None, :] < D))


# The gradient kernels hold a tile of rows at the whole padded width (BLOCK_DO = next power
# of two ≥ D) as a tl.dot operand, and an accumulator as wide. A full-width row tile stays
# within _GRAD_TILE_BYTES of shared memory where it can (tiles shrink down to 16 rows), and
# an embedding is too wide when even 16 rows would pass twice that (H100: 227 KiB per SM):
# 2048 features in fp32, 1024 in fp64.
_GRAD_TILE_BYTES = 64 * 1024


def max_dim(dtype: torch.dtype) -> int:
    """The widest embedding the gradient kernels take for inputs of `dtype`."""
    return 2 * _GRAD_TILE_BYTES // (16 * torch.empty(0, dtype=dtype).element_size())


def launch_config(x, r, grad: bool = False):
    """Tile sizes and meta-parameters shared by this engine's pair losses: rows and
    reference rows per tile, the feature step of S's products, the padded width of the
    gradient accumulators, accumulation type, tl.dot precision, warps. For the gradient
    kernels (grad=True) the row tiles shrink (to 16 at least) as D grows, so that a
    full-width tile of rows and the BLOCK×BLOCK_DO accumulator fit."""
    dev, d = x.device, x.shape[1]
    block_do = max(16, next_pow2(d))
    tune = tile_override() if dev.type == "cuda" else {}
    bm = tune.get("bm", row_block(x.shape[0], dev))
    bn = tune.get("bn", row_block(r.shape[0], dev))
    if grad:
        cap = max(16, _GRAD_TILE_BYTES // (block_do * x.element_size()))
        bm, bn = min(bm, cap), min(bn, cap)
    cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=tune.get("bd", dim_block(d, dev)),
               ACC=acc_dtype(x.dtype), PRECISION=dot_precision(x.dtype, dev))
    warps = {}
    if dev.type == "cuda":
        warps = dict(num_warps=tune.get("warps", 4 if block_do <= 128 else 8))
        if "stages" in tune:
            warps["num_stages"] = tune["stages"]
    return cfg, block_do, warps


def tile_override() -> dict:
    """METRIX_OPS_TRITON_TILES="bm=64,bn=32,bd=32,warps=4,stages=3" (any subset): tile sizes
    and launch settings for a sweep on a GPU (benchmarks/sweep_triton.py), so that one device
    call can time several; the defaults above are what runs without it. Tile sizes are powers
    of two ≥ 16."""
    spec = os.environ.get("METRIX_OPS_TRITON_TILES", "").strip()
    out = {}
    for item in filter(None, spec.split(",")):
        key, _, val = item.partition("=")
        key = key.strip()
        if key not in ("bm", "bn", "bd", "warps", "stages") or not val.strip().isdigit():
            raise ValueError(f"METRIX_OPS_TRITON_TILES: bad entry {item!r}; expected "
                             "bm=, bn=, bd=, warps=, stages= with integer values")
        v = int(val)
        if key in ("bm", "bn", "bd") and (v < 16 or v & (v - 1)):
            raise ValueError(f"METRIX_OPS_TRITON_TILES: {key}={v} must be a power of two ≥ 16")
        out[key] = v
    return out


def loss_constants(x, *values):
    # the loss constants as a tensor of x's dtype: a Python float argument would be an fp32
    # scalar inside the kernel, off by 1e-8 relative for fp64 inputs
    return torch.tensor(values, dtype=x.dtype, device=x.device)


def pair_grads(grad_tile, x, r, labels, ref_labels, prm, row_vecs, exclude_diag, symmetric,
               need_x, need_r, mine=None, raw=False):
    """(dX, dR) of a pair loss (None where not needed) by the shared gradient kernels;
    row_vecs: the three per-anchor vectors grad_tile reads (a, b, c). symmetric: r is x and
    ref_labels is labels, self pairs excluded; then dX is the whole gradient of that one
    tensor (one kernel, pair_grad_sym_kernel) and dR is None. mine: (hardest negative,
    hardest positive, ε as a 1-element tensor) per anchor: only the pairs
    MultiSimilarityMiner keeps. raw: x and r are rows of any norm, read at their L2
    distances (grad_tile sees the similarity unit rows would have there)."""
    b, m, d = x.shape[0], r.shape[0], x.shape[1]
    cfg, block_do, warps = launch_config(x, r, grad=True)
    thresholds = tuple(mine) if mine is not None else (x, x, x)  # unread without MINE
    table = raw_table(x, r) if raw else x  # unread without RAW
    if symmetric:
        dx = torch.empty_like(x)
        pair_grad_sym_kernel[(triton.cdiv(b, cfg["BLOCK_M"]),)](
            x, labels, prm, *row_vecs, dx, *thresholds, table, b, d, x.stride(0),
            dx.stride(0), GRAD_TILE=grad_tile, BLOCK_DO=block_do, MINE=mine is not None,
            RAW=bool(raw), **cfg, **warps)
        return dx, None
    args = (x, r, labels, ref_labels, prm, *row_vecs)
    meta = dict(GRAD_TILE=grad_tile, EXCLUDE_DIAG=bool(exclude_diag), BLOCK_DO=block_do,
                MINE=mine is not None, RAW=bool(raw), **cfg, **warps)
    dx = dr = None
    if need_x:
        dx = torch.empty_like(x)
        pair_grad_dx_kernel[(triton.cdiv(b, cfg["BLOCK_M"]),)](
            *args, dx, *thresholds, table, b, m, d, x.stride(0), r.stride(0), dx.stride(0),
            **meta)
    if need_r:
        dr = torch.empty_like(r)
        pair_grad_dr_kernel[(triton.cdiv(m, cfg["BLOCK_N"]),)](
            *args, dr, *thresholds, table, b, m, d, x.stride(0), r.stride(0), dr.stride(0),
            **meta)
    return dx, dr


def grads_or_empty(dx, dr, x):
    """A gradient op's outputs: a tensor for each, empty where it was not computed."""
    return (x.new_empty(0) if dx is None else dx), (x.new_empty(0) if dr is None else dr)


def fake_grads(x, r, need_x, need_r):
    return (torch.empty_like(x) if need_x else x.new_empty(0),
            torch.empty_like(r) if need_r else r.new_empty(0))


def needs_grads(ctx, symmetric):
    """(need_x, need_r) for a gradient op; symmetric (x and r one tensor): its whole gradient
    comes back as dX."""
    need_x, need_r = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    return (need_x or need_r, False) if symmetric else (need_x, need_r)


def is_symmetric(x, r, labels, ref_labels, exclude_diag) -> bool:
    """One tensor against itself with its own labels, self pairs excluded: S and the pair
    masks are symmetric."""
    return bool(exclude_diag) and x is r and labels is ref_labels
