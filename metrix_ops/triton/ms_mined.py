"""MultiSimilarityLoss with MultiSimilarityMiner as a loss option (`miner=`) on the Triton
engine: PML's `loss(emb, labels, miner(emb, labels))` without the miner's B×M matrix or its
index tuple, as the CPU op does it (fused/multi_similarity.py's miner path):

1. `_ms_bounds_kernel`: per anchor, its hardest negative (largest s over its negatives, −inf
   without one) and hardest positive (smallest s over its positives, +inf without one),
   streaming column tiles of S by tl.dot; not differentiated (PML's miner is not);
2. the MS forward kernel (multi_similarity.py) with MINE: only the pairs the miner keeps, a
   positive when s − ε < hardest negative and a negative when s + ε > hardest positive
   (pairs.mined_masks), counting each row's kept pairs for PML's no-pairs rule;
3. the shared gradient kernels of pairs.py with the same masks (for the batch against
   itself, the transposed tile takes its own rows' thresholds).
S is recomputed in every pass by tile products whose block sizes may differ (the gradient
kernels take smaller tiles at large D, and the symmetric one reads row j's pairs as the
transpose of row i's tile), so a pair's s can differ from the one its row's threshold was
found with in the last bit; that changes a kept pair only at an exact tie with the
threshold (ε = 0 and one embedding under two labels, say)."""
import torch

from ..ops.autograd import call, register_autograd
import triton
import triton.language as tl

from .. import fused
from ..fused.multi_similarity import mined_loss, miner_fits
from .launch import triton_op, usable_on
from .multi_similarity import ms_backward, ms_forward, supports as clean_supports
from .pairs import fake_grads, grads_or_empty, is_symmetric, launch_config, loss_constants
from .pairs import needs_grads
from .tiles import pair_masks, sim_tile


@triton.jit
def _ms_bounds_kernel(x_ptr, r_ptr, lab_ptr, rlab_ptr, hn_ptr, hp_ptr, B, M, D, stride_x,
                      stride_r, EXCLUDE_DIAG: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
                      PRECISION: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < B
    lab_m = tl.load(lab_ptr + offs_m, mask=row_ok, other=0)
    hn = tl.full((BLOCK_M,), float("-inf"), ACC)
    hp = tl.full((BLOCK_M,), float("inf"), ACC)
    for n0 in range(0, M, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        lab_n = tl.load(rlab_ptr + offs_n, mask=offs_n < M, other=0)
        s = sim_tile(x_ptr, r_ptr, offs_m, offs_n, B, M, D, stride_x, stride_r,
                     BLOCK_M, BLOCK_N, BLOCK_D, ACC, PRECISION)
        pos, neg = pair_masks(offs_m, offs_n, lab_m, lab_n, B, M, EXCLUDE_DIAG)
        hn = tl.maximum(hn, tl.max(tl.where(neg, s, float("-inf")), axis=1))
        hp = tl.minimum(hp, tl.min(tl.where(pos, s, float("inf")), axis=1))
    tl.store(hn_ptr + offs_m, hn, mask=row_ok)
    tl.store(hp_ptr + offs_m, hp, mask=row_ok)


def mine_bounds(x, r, labels, ref_labels, exclude_diag):
    """(hardest negative, hardest positive) per anchor of contiguous unit rows."""
    b = x.shape[0]
    hn, hp = (torch.empty(b, dtype=x.dtype, device=x.device) for _ in range(2))
    if b > 0:
        cfg, _, warps = launch_config(x, r)
        _ms_bounds_kernel[(triton.cdiv(b, cfg["BLOCK_M"]),)](
            x, r, labels, ref_labels, hn, hp, b, r.shape[0], x.shape[1], x.stride(0),
            r.stride(0), EXCLUDE_DIAG=bool(exclude_diag), **cfg, **warps)
    return hn, hp


_FWD = "metrix_ops::triton_ms_mined_rows"
_BWD = "metrix_ops::triton_ms_mined_rows_bwd"


@triton_op(_FWD)
def _ms_mined_op(x: torch.Tensor, r: torch.Tensor, labels: torch.Tensor,
                 ref_labels: torch.Tensor, exclude_diag: bool, alpha: float, beta: float,
                 base: float, eps: float, symmetric: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                            torch.Tensor, torch.Tensor]:
    """(rows, lse⁺, lse⁻, kept pairs B×2, hardest negative, hardest positive) over the pairs
    the miner keeps; only rows is differentiable."""
    x, r = x.contiguous(), r.contiguous()
    labels, ref_labels = labels.contiguous().long(), ref_labels.contiguous().long()
    hn, hp = mine_bounds(x, r, labels, ref_labels, exclude_diag)
    rows, lp, ln, kept = ms_forward(x, r, labels, ref_labels, exclude_diag,
                                    loss_constants(x, alpha, beta, base),
                                    (hn, hp, loss_constants(x, eps)))
    return rows, lp, ln, kept, hn, hp


@_ms_mined_op.register_fake
def _(x, r, labels, ref_labels, exclude_diag, alpha, beta, base, eps, symmetric):
    b = x.shape[0]
    vec = [x.new_empty(b) for _ in range(5)]
    return vec[0], vec[1], vec[2], x.new_empty((b, 2), dtype=torch.long), vec[3], vec[4]


@triton_op(_BWD)
def _ms_mined_bwd_op(g_rows: torch.Tensor, x: torch.Tensor, r: torch.Tensor,
                     labels: torch.Tensor, ref_labels: torch.Tensor, lse_pos: torch.Tensor,
                     lse_neg: torch.Tensor, hardest_neg: torch.Tensor,
                     hardest_pos: torch.Tensor, exclude_diag: bool, alpha: float, beta: float,
                     base: float, eps: float, symmetric: bool, need_x: bool, need_r: bool
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    x, r = x.contiguous(), r.contiguous()
    mine = (hardest_neg.contiguous(), hardest_pos.contiguous(), loss_constants(x, eps))
    dx, dr = ms_backward(g_rows.to(x.dtype).contiguous(), x, r, labels.contiguous().long(),
                         ref_labels.contiguous().long(), lse_pos.contiguous(),
                         lse_neg.contiguous(), exclude_diag, symmetric,
                         loss_constants(x, alpha, beta, base), need_x, need_r, mine)
    return grads_or_empty(dx, dr, x)


@_ms_mined_bwd_op.register_fake
def _(g_rows, x, r, labels, ref_labels, lse_pos, lse_neg, hardest_neg, hardest_pos,
      exclude_diag, alpha, beta, base, eps, symmetric, need_x, need_r):
    return fake_grads(x, r, need_x, need_r)


def _setup(ctx, inputs, output):
    x, r, labels, ref_labels, *consts = inputs
    rows, lp, ln, kept, hn, hp = output
    ctx.save_for_backward(x, r, labels, ref_labels, lp, ln, hn, hp)
    ctx.consts = tuple(consts)
    ctx.mark_non_differentiable(lp, ln, kept, hn, hp)


def _backward(ctx, g_rows, *_):
    need_x, need_r = needs_grads(ctx, ctx.consts[-1])
    dx, dr = torch.ops.metrix_ops.triton_ms_mined_rows_bwd(g_rows, *ctx.saved_tensors,
                                                          *ctx.consts, need_x, need_r)
    return ((dx if need_x else None), (dr if need_r else None)) + (None,) * 8


register_autograd(_FWD, _backward, setup_context=_setup)


def ms_mined_rows_triton(x_unit, r_unit, labels, ref_labels, exclude_diag: bool, alpha: float,
                         beta: float, base: float, eps: float):
    """The Triton twin of ops.ms_mined_rows: per-anchor MS terms over the pairs
    MultiSimilarityMiner(eps) keeps, and the kept (positive, negative) pairs per anchor."""
    rows, _, _, kept, _, _ = call(torch.ops.metrix_ops.triton_ms_mined_rows,
        x_unit, r_unit, labels, ref_labels, bool(exclude_diag), float(alpha), float(beta),
        float(base), float(eps), is_symmetric(x_unit, r_unit, labels, ref_labels, exclude_diag))
    return rows, kept


def miner_supports(params, inp, miner) -> bool:
    return (clean_supports(params, inp, None) and miner_fits(inp, miner)
            and usable_on(inp.embeddings.device, inp.embeddings.dtype))


def miner_impl(params, inp, reducer, miner):
    return mined_loss(params, inp, reducer, miner, ms_mined_rows_triton)


fused.register_miner("triton", "MultiSimilarityLoss", miner_supports, miner_impl)
