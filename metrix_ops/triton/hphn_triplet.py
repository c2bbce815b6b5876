"""HPHNTripletLoss (the EE paper's batch-hard triplet, clean) on the Triton engine
(backend="triton"): per anchor the farthest positive and the closest negative, mined by one
streaming kernel without gradient, then only those 2·B distances recomputed with gradient in
PyTorch from gathered unit rows (as the CPU path, fused/hphn_triplet.py). Memory O(B·D).

Mining (_hphn_mine_kernel, one program per BLOCK_M anchors): streams column tiles S = X Rᵀ
by tl.dot and keeps per row, flash-style, a running min of s over positives with its argmin
and a running max of s over negatives with its argmax. Both distances are monotone in s
(L2 of unit rows d = √(2 − 2s); cosine "far" is small s), so the farthest positive is the
smallest s and the closest negative the largest. Ties go to the lowest column, as the
reference's torch.argmax/argmin: within a tile the smallest tied index is taken, and a later
tile replaces the running pick only when strictly better. Equal rows give bit-equal s (every
entry is computed by the same code), so duplicates tie exactly and pick the lower index.

Not covered (supports() is False, "auto" takes another backend): indices_tuple, distances
other than cosine and normalised L2. With expansion= (EE's synthetic anchor and negative
points) the loss goes to triton/ee_hphn.py, whose picks reuse this module's positive mining."""
import torch
import triton
import triton.language as tl

from .. import fused
from ..distances import is_cosine, is_normalized_l2
from ..reducers import reduce_loss_dict
from ..reference.expansion_points import safe_sqrt
from ..reference.hphn_triplet import hphn_terms
from ..ops.unit_rows import normalized
from .launch import triton_op, usable_on
from .pairs import launch_config, max_dim
from .tiles import pair_masks, raw_table, raw_unit_sims, sim_tile


@triton.jit
def _hphn_mine_kernel(x_ptr, r_ptr, lab_ptr, rlab_ptr, out_ptr, raw_ptr, B, M, D, stride_x,
                      stride_r, EXCLUDE_DIAG: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
                      PRECISION: tl.constexpr, RAW: tl.constexpr = False):
    """RAW: rows of any norm, picked by their L2 distance (s read as 1 − d²/2 from the rows'
    norms, tiles.raw_unit_sims: it falls as d grows, so the same min/max picks)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < B
    lab_m = tl.load(lab_ptr + offs_m, mask=row_ok, other=0)
    # running (value, column) of the farthest positive (min s) and closest negative (max s);
    # column M means none yet
    pmin = tl.full((BLOCK_M,), float("inf"), ACC)
    pcol = tl.zeros((BLOCK_M,), tl.int32) + M
    nmax = tl.full((BLOCK_M,), float("-inf"), ACC)
    ncol = tl.zeros((BLOCK_M,), tl.int32) + M
    for n0 in range(0, M, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        lab_n = tl.load(rlab_ptr + offs_n, mask=offs_n < M, other=0)
        s = sim_tile(x_ptr, r_ptr, offs_m, offs_n, B, M, D, stride_x, stride_r,
                     BLOCK_M, BLOCK_N, BLOCK_D, ACC, PRECISION)
        if RAW:
            s = raw_unit_sims(s, raw_ptr, offs_m, offs_n, B, M)
        pos, neg = pair_masks(offs_m, offs_n, lab_m, lab_n, B, M, EXCLUDE_DIAG)
        cols = offs_n[None, :].to(tl.int32)
        sp = tl.where(pos, s, float("inf"))
        tmin = tl.min(sp, axis=1)
        targ = tl.min(tl.where(pos & (sp == tmin[:, None]), cols, M), axis=1)
        better = targ < M
        better = better & ((tmin < pmin) | (pcol == M))
        pcol = tl.where(better, targ, pcol)
        pmin = tl.where(better, tmin, pmin)
        sn = tl.where(neg, s, float("-inf"))
        tmax = tl.max(sn, axis=1)
        targ = tl.min(tl.where(neg & (sn == tmax[:, None]), cols, M), axis=1)
        better = targ < M
        better = better & ((tmax > nmax) | (ncol == M))
        ncol = tl.where(better, targ, ncol)
        nmax = tl.where(better, tmax, nmax)
    tl.store(out_ptr + offs_m * 2, tl.where(pcol < M, pcol, -1).to(tl.int64), mask=row_ok)
    tl.store(out_ptr + offs_m * 2 + 1, tl.where(ncol < M, ncol, -1).to(tl.int64), mask=row_ok)


def _mine(x, r, labels, ref_labels, exclude_diag, raw):
    b = x.shape[0]
    out = torch.empty(b, 2, dtype=torch.long, device=x.device)
    cfg, _, warps = launch_config(x, r)
    _hphn_mine_kernel[(triton.cdiv(b, cfg["BLOCK_M"]),)](
        x, r, labels, ref_labels, out, raw_table(x, r) if raw else x, b, r.shape[0],
        x.shape[1], x.stride(0), r.stride(0), EXCLUDE_DIAG=exclude_diag, RAW=raw, **cfg,
        **warps)
    return out


@triton_op("metrix_ops::triton_hphn_mine")
def _hphn_mine_op(x: torch.Tensor, r: torch.Tensor, labels: torch.Tensor,
                  ref_labels: torch.Tensor, exclude_diag: bool, raw: bool = False
                  ) -> torch.Tensor:
    if exclude_diag and x.shape[0] > r.shape[0]:
        raise ValueError("exclude_diag needs r to start with the batch (at least as many "
                         "rows as x)")
    return _mine(x.contiguous(), r.contiguous(), labels.contiguous().long(),
                 ref_labels.contiguous().long(), exclude_diag, raw)


@_hphn_mine_op.register_fake
def _(x, r, labels, ref_labels, exclude_diag, raw=False):
    return x.new_empty(x.shape[0], 2, dtype=torch.long)


def hphn_mine_triton(x_unit, r_unit, labels, ref_labels, exclude_diag: bool,
                     raw: bool = False) -> torch.Tensor:
    """B × 2 int64 [farthest positive, closest negative] column of each anchor (−1: none),
    ties to the lowest column; no gradient. raw: rows of any norm, by their L2 distance."""
    return torch.ops.metrix_ops.triton_hphn_mine(x_unit.detach(), r_unit.detach(), labels,
                                                 ref_labels, bool(exclude_diag), bool(raw))


def supports(params, inp, expansion) -> bool:
    x, d = inp.embeddings, inp.distance
    return (expansion is None and inp.indices_tuple is None and inp.labels is not None
            and (is_cosine(d) or is_normalized_l2(d)) and x.shape[1] <= max_dim(x.dtype)
            and usable_on(x.device, x.dtype))


def impl(params, inp, reducer):
    x, d = inp.embeddings, inp.distance
    xu = normalized(d, x)
    ru = xu if inp.ref_emb is x else normalized(d, inp.ref_emb)
    idx = hphn_mine_triton(xu, ru, inp.labels, inp.ref_labels, inp.same_set)
    has_pos, has_neg = idx[:, 0] >= 0, idx[:, 1] >= 0
    idx = idx.clamp_min(0)  # rows without a pick compute a throw-away value
    rp, rn = ru[idx[:, 0]], ru[idx[:, 1]]
    if d.is_inverted:
        hp, hn = (xu * rp).sum(1), (xu * rn).sum(1)
    else:
        # the difference, as cdist: exact 0 (and no gradient) for duplicates
        hp = safe_sqrt(((xu - rp) ** 2).sum(1))
        hn = safe_sqrt(((xu - rn) ** 2).sum(1))
    terms = hphn_terms(hp, has_pos, hn, has_neg, d, params.get("margin", 0.2))
    return reduce_loss_dict(terms, reducer, x)


fused.register("triton", "HPHNTripletLoss", supports, impl)
