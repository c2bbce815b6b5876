"""MultiSimilarityLoss on the Triton engine (backend="triton"): the per-anchor terms
(1/α)log(1+Σ_P e^{−α(s−base)}) + (1/β)log(1+Σ_N e^{β(s−base)}) of unit anchors X (B×D)
against unit references R (M×D), flash-attention style, never storing a B×M matrix.

- forward (one program per BLOCK_M anchors): streams column tiles S = X Rᵀ by tl.dot and
  keeps, per row and side, an online log-sum-exp started from the e^0 term (the "1 +"),
  i.e. a running max m (from 0) and Σ e^{v−m} (from 1). Every exponent is taken relative to
  the running max, so β = 50 (e^{β(s−base)} up to e^{75}) or β = 400 never overflows.
- backward: G_ij = ∂L/∂s_ij = g_i·(−e^{−α(s_ij−base) − lse⁺_i}) on positives,
  g_i·e^{β(s_ij−base) − lse⁻_i} on negatives, 0 elsewhere. It depends on row i's statistics
  only, so dX = G R runs as row programs and dR = Gᵀ X as column programs (a second kernel),
  each owning its output rows: no atomics, deterministic. For the batch against itself
  (R = X, self pairs excluded: S symmetric) one kernel of row programs computes the whole
  gradient (G + Gᵀ) X, the tile (I, J) of Gᵀ being G_JI from the same s_ij and the
  statistics of rows J.

Why recompute S in the backward instead of saving it: saving S (or G) is the B×M memory
this op exists to avoid (8192² fp32 = 256 MiB per call, 4 GiB at 32768²). Recomputing costs
one S product per gradient kernel: for the batch against itself 3 products in all (forward
S; backward S and (G + Gᵀ) X), the count PML's autograd needs with S stored; with a
separate reference 5 (forward S; S and G R; S and Gᵀ X), about what a GPU would spend
writing S to HBM and reading it back twice, without the memory. All the forward saves is
O(B): the two log-sum-exps of each row. (One backward kernel adding dR by atomics would
save one S product but lose determinism.)

The gradient kernels (pair_grad_dx_kernel, pair_grad_dr_kernel, pair_grad_sym_kernel),
their launcher pair_grads and launch_config live in triton/pairs.py and serve every pair
loss of this engine: a loss supplies its G tile as a @triton.jit function.

Pair rules are PML's and the CPU op's: label equality is a positive, anything else a
negative; with exclude_diag (the batch against itself, or ref_labels *is* labels) row i and
column i are no pair. Normalisation and its gradient stay in PyTorch; PML's reduction and
no-pairs rule come from the CPU glue (fused/multi_similarity.py)."""
import torch

from ..ops.autograd import call, register_autograd
import triton
import triton.language as tl

from .. import fused
from ..distances import is_cosine
from ..fused.multi_similarity import _reduce_clean, self_pairs
from ..ops.unit_rows import unit_rows
from .launch import triton_op, usable_on
from .pairs import (fake_grads, grads_or_empty, is_symmetric, launch_config, loss_constants,
                    max_dim, mined_masks, needs_grads, pair_grads)
from .tiles import count_true, pair_masks, sim_tile


@triton.jit
def _ms_args(s, pos, neg, alpha, beta, base):
    """The tile's exponents: −α(s−base) on positives, β(s−base) on negatives, −inf elsewhere."""
    ap = tl.where(pos, -alpha * (s - base), float("-inf"))
    an = tl.where(neg, beta * (s - base), float("-inf"))
    return ap, an


@triton.jit
def _ms_fold(mp, sp, mn, sn, ap, an, pos):
    """Folds a tile's exponents into the rows' online log-sum-exps of both sides, each a
    (running max, Σ e^{v−max}) pair. One exp per entry: an entry is on one side at most."""
    mp_new = tl.maximum(mp, tl.max(ap, axis=1))  # finite: the state starts at the e^0 term
    mn_new = tl.maximum(mn, tl.max(an, axis=1))
    e = tl.exp(tl.where(pos, ap - mp_new[:, None], an - mn_new[:, None]))  # 0 off the pairs
    sp = sp * tl.exp(mp - mp_new) + tl.sum(tl.where(pos, e, 0.0), axis=1)
    sn = sn * tl.exp(mn - mn_new) + tl.sum(tl.where(pos, 0.0, e), axis=1)
    return mp_new, sp, mn_new, sn


@triton.jit
def _ms_grad_tile(s, pos, neg, g, lp, ln, prm_ptr):
    """G = ∂L/∂S of a tile from its rows' weights g and log-sum-exps lp, ln (BLOCK_M each)."""
    alpha, beta, base = tl.load(prm_ptr), tl.load(prm_ptr + 1), tl.load(prm_ptr + 2)
    ap, an = _ms_args(s, pos, neg, alpha, beta, base)
    # the exponent is ≤ 0 on a pair (its side's lse is ≥ each term), −inf (→ 0) elsewhere
    w = g[:, None] * tl.exp(tl.where(pos, ap - lp[:, None], an - ln[:, None]))
    return tl.where(pos, -w, w)


@triton.jit
def _ms_fwd_kernel(x_ptr, r_ptr, lab_ptr, rlab_ptr, prm_ptr, rows_ptr, lp_ptr, ln_ptr,
                   hn_ptr, hp_ptr, eps_ptr, kept_ptr, B, M, D, stride_x, stride_r,
                   EXCLUDE_DIAG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                   MINE: tl.constexpr = False):
    """MINE: over the pairs MultiSimilarityMiner keeps (pairs.mined_masks), counting each
    row's kept positive and negative pairs into kept (B×2 int64)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < B
    lab_m = tl.load(lab_ptr + offs_m, mask=row_ok, other=0)
    alpha, beta, base = tl.load(prm_ptr), tl.load(prm_ptr + 1), tl.load(prm_ptr + 2)
    # log(1 + Σ e^v): the e^0 term is the state's start (max 0, sum 1)
    mp = tl.zeros((BLOCK_M,), dtype=ACC)
    sp = tl.full((BLOCK_M,), 1.0, dtype=ACC)
    mn = tl.zeros((BLOCK_M,), dtype=ACC)
    sn = tl.full((BLOCK_M,), 1.0, dtype=ACC)
    kp = tl.zeros((BLOCK_M,), dtype=tl.int32)
    kn = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for n0 in range(0, M, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        lab_n = tl.load(rlab_ptr + offs_n, mask=offs_n < M, other=0)
        s = sim_tile(x_ptr, r_ptr, offs_m, offs_n, B, M, D, stride_x, stride_r,
                     BLOCK_M, BLOCK_N, BLOCK_D, ACC, PRECISION)
        pos, neg = pair_masks(offs_m, offs_n, lab_m, lab_n, B, M, EXCLUDE_DIAG)
        if MINE:
            pos, neg = mined_masks(s, pos, neg, offs_m, row_ok, hn_ptr, hp_ptr, eps_ptr)
            kp += count_true(pos, 1)
            kn += count_true(neg, 1)
        ap, an = _ms_args(s, pos, neg, alpha, beta, base)
        mp, sp, mn, sn = _ms_fold(mp, sp, mn, sn, ap, an, pos)
    if MINE:
        tl.store(kept_ptr + 2 * offs_m, kp.to(tl.int64), mask=row_ok)
        tl.store(kept_ptr + 2 * offs_m + 1, kn.to(tl.int64), mask=row_ok)
    lp = mp + tl.log(sp)
    ln = mn + tl.log(sn)
    tl.store(lp_ptr + offs_m, lp, mask=row_ok)
    tl.store(ln_ptr + offs_m, ln, mask=row_ok)
    tl.store(rows_ptr + offs_m, lp / alpha + ln / beta, mask=row_ok)


def ms_forward(x, r, labels, ref_labels, exclude_diag, prm, mine=None):
    """(rows, lse⁺, lse⁻), and with mine = (hardest negative, hardest positive, ε tensor) the
    rows over the pairs MultiSimilarityMiner keeps, with the kept counts (B×2) after them."""
    b = x.shape[0]
    rows, lp, ln = (torch.empty(b, dtype=x.dtype, device=x.device) for _ in range(3))
    kept = torch.zeros((b, 2), dtype=torch.long, device=x.device)
    cfg, _, warps = launch_config(x, r)
    grid = (triton.cdiv(b, cfg["BLOCK_M"]),)
    _ms_fwd_kernel[grid](x, r, labels, ref_labels, prm, rows, lp, ln,
                         *(mine if mine is not None else (x, x, x)), kept, b, r.shape[0],
                         x.shape[1], x.stride(0), r.stride(0), EXCLUDE_DIAG=exclude_diag,
                         MINE=mine is not None, **cfg, **warps)
    return (rows, lp, ln) if mine is None else (rows, lp, ln, kept)


def ms_backward(g, x, r, labels, ref_labels, lp, ln, exclude_diag, symmetric, prm, need_x,
                need_r, mine=None):
    return pair_grads(_ms_grad_tile, x, r, labels, ref_labels, prm, (g, lp, ln), exclude_diag,
                      symmetric, need_x, need_r, mine)


# The launches are torch.library custom ops: opaque to torch.compile (the module traces whole
# under fullgraph=True, as on the CPU backend), with fake kernels and autograd registered
# here. The backward op returns an empty tensor for a gradient no input needs (a memory
# bank's ref_emb, say): its kernel is skipped.
_FWD = "metrix_ops::triton_ms_rows"
_BWD = "metrix_ops::triton_ms_rows_bwd"


@triton_op(_FWD)
def _ms_rows_op(x: torch.Tensor, r: torch.Tensor, labels: torch.Tensor,
                ref_labels: torch.Tensor, exclude_diag: bool, alpha: float, beta: float,
                base: float, symmetric: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, r = x.contiguous(), r.contiguous()
    return ms_forward(x, r, labels.contiguous().long(), ref_labels.contiguous().long(),
                      exclude_diag, loss_constants(x, alpha, beta, base))


@_ms_rows_op.register_fake
def _(x, r, labels, ref_labels, exclude_diag, alpha, beta, base, symmetric):
    return x.new_empty(x.shape[0]), x.new_empty(x.shape[0]), x.new_empty(x.shape[0])


@triton_op(_BWD)
def _ms_rows_bwd_op(g_rows: torch.Tensor, x: torch.Tensor, r: torch.Tensor,
                    labels: torch.Tensor, ref_labels: torch.Tensor, lse_pos: torch.Tensor,
                    lse_neg: torch.Tensor, exclude_diag: bool, alpha: float, beta: float,
                    base: float, symmetric: bool, need_x: bool, need_r: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    x, r = x.contiguous(), r.contiguous()
    dx, dr = ms_backward(g_rows.to(x.dtype).contiguous(), x, r, labels.contiguous().long(),
                         ref_labels.contiguous().long(), lse_pos.contiguous(),
                         lse_neg.contiguous(), exclude_diag, symmetric,
                         loss_constants(x, alpha, beta, base), need_x, need_r)
    return grads_or_empty(dx, dr, x)


@_ms_rows_bwd_op.register_fake
def _(g_rows, x, r, labels, ref_labels, lse_pos, lse_neg, exclude_diag, alpha, beta, base,
      symmetric, need_x, need_r):
    return fake_grads(x, r, need_x, need_r)


def _ms_setup(ctx, inputs, output):
    x, r, labels, ref_labels, *consts = inputs
    ctx.save_for_backward(x, r, labels, ref_labels, output[1], output[2])
    ctx.consts = tuple(consts)
    ctx.mark_non_differentiable(output[1], output[2])


def _ms_backward_rule(ctx, g_rows, _g_lp, _g_ln):
    need_x, need_r = needs_grads(ctx, ctx.consts[-1])
    dx, dr = torch.ops.metrix_ops.triton_ms_rows_bwd(g_rows, *ctx.saved_tensors, *ctx.consts,
                                                    need_x, need_r)
    return ((dx if need_x else None), (dr if need_r else None)) + (None,) * 7


register_autograd(_FWD, _ms_backward_rule, setup_context=_ms_setup)


def ms_rows_triton(x_unit, r_unit, labels, ref_labels, exclude_diag: bool, alpha: float,
                   beta: float, base: float) -> torch.Tensor:
    """The Triton twin of ops.ms_loss_rows: per-anchor MS loss terms of unit rows x_unit
    against unit rows r_unit, differentiable in both. The batch against itself (r_unit *is*
    x_unit, ref_labels *is* labels, exclude_diag) takes the symmetric gradient kernel."""
    rows, _, _ = call(torch.ops.metrix_ops.triton_ms_rows,
        x_unit, r_unit, labels, ref_labels, bool(exclude_diag), float(alpha), float(beta),
        float(base), is_symmetric(x_unit, r_unit, labels, ref_labels, exclude_diag))
    return rows


def supports(params, inp, expansion) -> bool:
    x = inp.embeddings
    return (expansion is None and inp.indices_tuple is None and inp.labels is not None
            and is_cosine(inp.distance) and x.shape[1] <= max_dim(x.dtype)
            and usable_on(x.device, x.dtype))


def impl(params, inp, reducer):
    x = inp.embeddings
    xu = unit_rows(x)
    # the batch against itself passes one tensor twice: S's gradient reaches x both ways
    ru = xu if self_pairs(inp) else unit_rows(inp.ref_emb)
    rows = ms_rows_triton(xu, ru, inp.labels, inp.ref_labels, inp.same_set, params["alpha"],
                          params["beta"], params["base"])
    return _reduce_clean(rows, inp, reducer)


fused.register("triton", "MultiSimilarityLoss", supports, impl)
