"""ProxyAnchorLoss on the Triton engine: unit embeddings x (B×D) against unit proxies p (C×D),
S = x pᵀ streamed in tiles by tl.dot, never B×C in memory. The math is the CPU op's
(csrc/common/proxy_anchor.h, csrc/cpu/proxy_anchor_cpu.cpp); the loss dict and reducers are
the CPU path's (metrix_ops/fused/proxy_anchor.py).

Program layout, per kernel, and why:
- forward: column programs. The statistics are per proxy: log(1 + Σ e^{arg}) over a proxy's
  positives and over its negatives, a log-sum-exp down a column of S. One program owns a
  block of proxies and streams the batch (or one part of it, below) through an online
  log-sum-exp, so no statistic needs another program's data mid-stream (no atomics).
- backward dX = G p: row programs. G_ij needs the finished statistics of column j (and the
  upstream gradients of its two terms), which are C-long vectors loaded with each proxy
  tile; a program owns a block of examples and accumulates its rows of dX over all proxy
  tiles in registers, so each dX row is written once.
- backward dP = Gᵀ x: column programs, the same G recomputed from tiles of Sᵀ = p xᵀ; a
  program owns a block of proxies and accumulates their rows of dP over the batch.
Splitting dX and dP into two kernels recomputes S once more (a cheap tl.dot) instead of
adding partial products into a shared output with atomics (non-deterministic, and fp64
atomics are slow). Both gradient kernels also split D into output blocks (a second grid
axis) so that the accumulator of a program stays register-sized at any D; each output block
recomputes its S tiles (for D ≤ out_block(D), one block: no recomputation).
Column kernels own few rows when those are proxies (C = 100: two programs of 64), so on a
GPU they also split the streamed batch into parts (a grid axis; stream_splits): each part
writes its own partial log-sum-exp states (merged by one small kernel) or partial dP
(summed in PyTorch, O(parts·C·D)); deterministic.

Accumulation is in fp32 (fp64 for fp64 inputs); inputs reach the kernels as fp32 or fp64
(the driver computes half inputs in fp32, as every backend).
"""
from __future__ import annotations

import torch

from ..ops.autograd import call, register_autograd
from ..distances import is_cosine
from ..fused.proxy_anchor import terms_impl
from .launch import HAS_TRITON, dim_block, next_pow2, row_block, triton_op
from .tiles import acc_dtype, dot_precision

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .tiles import load_rows, sim_tile

    @triton.jit
    def online_lse(m, l, arg, mask):
        """Fold the masked entries of `arg` (rows of a tile) into per-row running
        log-sum-exp states (max m, sum l of e^{arg − m}); rows with nothing yet keep m = −inf."""
        m_new = tl.maximum(m, tl.max(tl.where(mask, arg, float("-inf")), 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no −inf − (−inf)
        # masked entries become e^{−inf} = 0 before the exp (never an overflow to discard)
        l = l * tl.exp(m - m_ref) + tl.sum(tl.exp(tl.where(mask, arg - m_ref[:, None],
                                                           float("-inf"))), 1)
        return m_new, l

    @triton.jit
    def rows_product(acc, g, rows_ptr, offs, n, offs_d, D, stride, PRECISION: tl.constexpr):
        """acc += g · R[offs, offs_d]: a G tile (or Gᵀ tile) times a block of rows."""
        r = load_rows(rows_ptr, offs, n, offs_d, D, stride)
        return acc + tl.dot(g.to(r.dtype), r, input_precision=PRECISION, out_dtype=acc.dtype)

    @triton.jit
    def store_rows(ptr, acc, offs, n, offs_d, D, stride):
        mask = (offs[:, None] < n) & (offs_d[None, :] < D)
        tl.store(ptr + offs[:, None] * stride + offs_d[None, :], acc, mask=mask)

    @triton.jit
    def _pa_grad(s, own, valid, alpha, margin, gp, gn, lp, ln):
        """∂L/∂s of each entry (pa_grad of proxy_anchor.h): −α·gp·e^{−α(s−δ) − lp} for a
        positive, α·gn·e^{α(s+δ) − ln} for a negative; gp, gn, lp, ln broadcast along the
        proxy axis. Exponents are ≤ 0 up to rounding (each entry is a term of its lse)."""
        arg = tl.where(own, -alpha * (s - margin) - lp, alpha * (s + margin) - ln)
        coef = tl.where(own, -alpha * gp, alpha * gn)
        return tl.where(valid, coef * tl.exp(arg), 0.0)

    @triton.jit
    def _pa_fwd_kernel(x_ptr, p_ptr, y_ptr, state_ptr, B, C, D, stride_x, stride_p, split_len,
                       hp_ptr, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr,
                       BLOCK_D: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr):
        """Per proxy, the positives' and negatives' log-sum-exp states (max, Σ e^{arg − max})
        over the examples of split program_id(1); state is (4, splits, C)."""
        alpha, margin = tl.load(hp_ptr).to(ACC), tl.load(hp_ptr + 1).to(ACC)
        offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        split, n_splits = tl.program_id(1), tl.num_programs(1)
        b_lo = split * split_len
        m_pos = tl.zeros((BLOCK_C,), dtype=ACC) + float("-inf")
        l_pos = tl.zeros((BLOCK_C,), dtype=ACC)
        m_neg = tl.zeros((BLOCK_C,), dtype=ACC) + float("-inf")
        l_neg = tl.zeros((BLOCK_C,), dtype=ACC)
        for b0 in range(b_lo, tl.minimum(b_lo + split_len, B), BLOCK_B):
            offs_b = b0 + tl.arange(0, BLOCK_B)
            st = sim_tile(p_ptr, x_ptr, offs_c, offs_b, C, B, D, stride_p, stride_x,
                          BLOCK_C, BLOCK_B, BLOCK_D, ACC, PRECISION)  # Sᵀ tile: proxy × example
            y = tl.load(y_ptr + offs_b, mask=offs_b < B, other=-1)
            own = y[None, :] == offs_c[:, None]
            other = y[None, :] != offs_c[:, None]  # (triton 3.2's interpreter: no ~ of bools)
            in_b = (offs_b < B)[None, :]
            m_pos, l_pos = online_lse(m_pos, l_pos, -alpha * (st - margin), own & in_b)
            m_neg, l_neg = online_lse(m_neg, l_neg, alpha * (st + margin), other & in_b)
        out = state_ptr + split * C + offs_c
        step = n_splits * C
        in_c = offs_c < C
        tl.store(out, m_pos, mask=in_c)
        tl.store(out + step, l_pos, mask=in_c)
        tl.store(out + 2 * step, m_neg, mask=in_c)
        tl.store(out + 3 * step, l_neg, mask=in_c)

    @triton.jit
    def _merge_lse_one_kernel(state_ptr, pos_ptr, neg_ptr, S, C, BLOCK_C: tl.constexpr,
                              ACC: tl.constexpr):
        """log(1 + Σ) per proxy from the forward's S partial states (state (4, S, C): max and
        sum of the positives, then of the negatives); program_id(1) picks the side. One
        launch where the plain-torch merge took 13 small ones per side."""
        offs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        side = tl.program_id(1)
        in_c = offs < C
        m_ptr = state_ptr + 2 * side * S * C + offs
        l_ptr = m_ptr + S * C
        top = tl.zeros((BLOCK_C,), dtype=ACC)  # the 1 is e^0: the max is at least 0
        for k in range(S):
            top = tl.maximum(top, tl.load(m_ptr + k * C, mask=in_c, other=float("-inf")))
        acc = tl.exp(-top)
        for k in range(S):
            m = tl.load(m_ptr + k * C, mask=in_c, other=float("-inf"))
            # an empty part (m = −inf, l = 0) adds 0
            acc += tl.load(l_ptr + k * C, mask=in_c, other=0.0) * tl.exp(m - top)
        if side == 0:
            tl.store(pos_ptr + offs, top + tl.log(acc), mask=in_c)
        else:
            tl.store(neg_ptr + offs, top + tl.log(acc), mask=in_c)

    @triton.jit
    def _pa_dx_kernel(x_ptr, p_ptr, y_ptr, gp_ptr, gn_ptr, lp_ptr, ln_ptr, dx_ptr, B, C, D,
                      stride_x, stride_p, stride_dx, hp_ptr, BLOCK_B: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
                      ACC: tl.constexpr, PRECISION: tl.constexpr):
        alpha, margin = tl.load(hp_ptr).to(ACC), tl.load(hp_ptr + 1).to(ACC)
        offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        offs_do = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
        y = tl.load(y_ptr + offs_b, mask=offs_b < B, other=-1)
        acc = tl.zeros((BLOCK_B, BLOCK_DO), dtype=ACC)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            in_c = offs_c < C
            s = sim_tile(x_ptr, p_ptr, offs_b, offs_c, B, C, D, stride_x, stride_p,
                         BLOCK_B, BLOCK_C, BLOCK_D, ACC, PRECISION)
            gp = tl.load(gp_ptr + offs_c, mask=in_c, other=0.0).to(ACC)
            gn = tl.load(gn_ptr + offs_c, mask=in_c, other=0.0).to(ACC)
            lp = tl.load(lp_ptr + offs_c, mask=in_c, other=0.0).to(ACC)
            ln = tl.load(ln_ptr + offs_c, mask=in_c, other=0.0).to(ACC)
            valid = (offs_b < B)[:, None] & in_c[None, :]
            g = _pa_grad(s, y[:, None] == offs_c[None, :], valid, alpha, margin,
                         gp[None, :], gn[None, :], lp[None, :], ln[None, :])
            acc = rows_product(acc, g, p_ptr, offs_c, C, offs_do, D, stride_p, PRECISION)
        store_rows(dx_ptr, acc, offs_b, B, offs_do, D, stride_dx)

    @triton.jit
    def _pa_dp_kernel(x_ptr, p_ptr, y_ptr, gp_ptr, gn_ptr, lp_ptr, ln_ptr, dp_ptr, B, C, D,
                      stride_x, stride_p, stride_dp, split_len, hp_ptr, BLOCK_C: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
                      ACC: tl.constexpr, PRECISION: tl.constexpr):
        """Split program_id(2)'s part of dP (its examples only) into dp[split]."""
        alpha, margin = tl.load(hp_ptr).to(ACC), tl.load(hp_ptr + 1).to(ACC)
        b_lo = tl.program_id(2) * split_len
        offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        offs_do = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
        in_c = offs_c < C
        gp = tl.load(gp_ptr + offs_c, mask=in_c, other=0.0).to(ACC)[:, None]
        gn = tl.load(gn_ptr + offs_c, mask=in_c, other=0.0).to(ACC)[:, None]
        lp = tl.load(lp_ptr + offs_c, mask=in_c, other=0.0).to(ACC)[:, None]
        ln = tl.load(ln_ptr + offs_c, mask=in_c, other=0.0).to(ACC)[:, None]
        acc = tl.zeros((BLOCK_C, BLOCK_DO), dtype=ACC)
        for b0 in range(b_lo, tl.minimum(b_lo + split_len, B), BLOCK_B):
            offs_b = b0 + tl.arange(0, BLOCK_B)
            st = sim_tile(p_ptr, x_ptr, offs_c, offs_b, C, B, D, stride_p, stride_x,
                          BLOCK_C, BLOCK_B, BLOCK_D, ACC, PRECISION)
            y = tl.load(y_ptr + offs_b, mask=offs_b < B, other=-1)
            valid = in_c[:, None] & (offs_b < B)[None, :]
            gt = _pa_grad(st, y[None, :] == offs_c[:, None], valid, alpha, margin, gp, gn, lp, ln)
            acc = rows_product(acc, gt, x_ptr, offs_b, B, offs_do, D, stride_x, PRECISION)
        store_rows(dp_ptr + tl.program_id(2) * C * stride_dp, acc, offs_c, C, offs_do, D,
                   stride_dp)


def out_block(d: int, device: torch.device) -> int:
    """Output feature columns per program of a gradient kernel (its accumulator is
    rows × out_block). On a GPU at most 256 wide (GPU_TILES narrows it further), so the
    accumulator stays in registers; the interpreter takes all of D at once (fewer programs:
    faster, and no recomputation)."""
    full = max(16, next_pow2(d))
    return min(full, 256) if device.type == "cuda" else full


# Block sizes on a GPU per (input dtype, gradient kernel?): (own rows, streamed rows, feature
# chunk, output features, warps). Checked by compiling every kernel for sm_90 and reading
# ptxas's report: no register spills. Gradient kernels hold an own × output-features
# accumulator besides the S tile, hence fewer own rows.
GPU_TILES = {
    (torch.float32, False): (64, 64, 32, None, 8),
    (torch.float64, False): (64, 32, 32, None, 8),
    (torch.float32, True): (32, 64, 64, 256, 8),
    (torch.float64, True): (32, 32, 64, 128, 8),
}


def tile_config(x: torch.Tensor, n_own: int, n_loop: int, grad: bool = False) -> dict:
    """Block sizes of a launch whose programs own `n_own` rows and stream `n_loop` (grad: a
    gradient kernel, with an output-feature block), and the launch keywords every kernel
    takes (kw: ACC, PRECISION, num_warps)."""
    d, dev = x.shape[1], x.device
    own, loop = row_block(n_own, dev), row_block(n_loop, dev)
    dd, out, warps = dim_block(d, dev), out_block(d, dev), 4
    if dev.type == "cuda":
        t_own, t_loop, t_d, t_out, warps = GPU_TILES[(x.dtype, grad)]
        own, loop, dd = min(own, t_own), min(loop, t_loop), min(dd, t_d)
        out = min(out, t_out or out)
    kw = dict(ACC=acc_dtype(x.dtype), PRECISION=dot_precision(x.dtype, dev), num_warps=warps)
    return dict(own=own, loop=loop, d=dd, out=out, kw=kw)


def check_unit_inputs(x, p, labels):
    """The kernels' contract (internal callers only; the user-facing checks are the
    reference's, run before): same-dtype fp32/fp64 2-D x and p on one device, labels int64."""
    if x.dtype not in (torch.float32, torch.float64) or p.dtype != x.dtype:
        raise TypeError(f"x and p must both be float32 or float64, got {x.dtype} and {p.dtype}")
    if x.ndim != 2 or p.ndim != 2 or x.shape[1] != p.shape[1]:
        raise ValueError(f"x and p must be 2-D with the same D, got {tuple(x.shape)} and "
                         f"{tuple(p.shape)}")
    if labels.dtype != torch.int64 or labels.shape != (x.shape[0],):
        raise ValueError(f"labels must be int64 of shape ({x.shape[0]},)")


def hyper(x: torch.Tensor, *values: float) -> torch.Tensor:
    """Scalar hyper-parameters for a kernel, as a tensor of the inputs' dtype: a Python float
    argument would reach a compiled kernel as fp32 (the interpreter keeps fp64), and fp64
    inputs must see fp64 constants."""
    return torch.tensor([float(v) for v in values], dtype=x.dtype, device=x.device)


def stream_splits(n_programs: int, n_stream: int, n_own: int, device: torch.device) -> int:
    """How many parts a column kernel splits its streamed axis into (programs of its own
    along a grid axis, partial results merged in PyTorch; deterministic, no atomics). A
    column kernel owns few rows when they are proxies (C = 100 makes 2 programs of 64): on a
    GPU the parts bring the grid to about 4 programs per SM, each part at least 4 tiles
    long, and the partial dP (parts × C × D) stays under 4·B·D. The interpreter runs
    programs one after another: one part."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = -(-4 * sms // max(n_programs, 1))
    return max(1, min(want, n_stream // 256, 4 * n_stream // max(n_own, 1)))


def split_len(n_stream: int, splits: int, block: int) -> int:
    """Rows of the streamed axis per part: a multiple of the tile, so parts never share one."""
    return -(-(-(-n_stream // splits)) // block) * block


def _grids(n_own: int, d: int, t: dict, splits: int = 1):
    return (triton.cdiv(n_own, t["own"]), triton.cdiv(d, t["out"]), splits)


def column_grads(kernel, x, own, inputs, hp, names, **const):
    """dOwn = Gᵀ x by a column kernel: programs own blocks of `own`'s rows (proxies, or
    references) and stream x's rows, split into parts along the streamed axis; returns the
    parts' sum. Column kernels take (*inputs, out, B, n_own, D, stride_x, stride_own,
    stride_out, split_len, hp, <names[0]: own block>, <names[1]: streamed block>, BLOCK_D,
    BLOCK_DO, *const, ACC, PRECISION)."""
    n_stream, n_own, d = x.shape[0], own.shape[0], x.shape[1]
    t = tile_config(x, n_own, n_stream, grad=True)
    splits = stream_splits(triton.cdiv(n_own, t["own"]) * triton.cdiv(d, t["out"]), n_stream,
                           n_own, x.device)
    part = x.new_empty(splits, n_own, d)
    blocks = {names[0]: t["own"], names[1]: t["loop"], "BLOCK_D": t["d"], "BLOCK_DO": t["out"]}
    kernel[_grids(n_own, d, t, splits)](
        *inputs, part, n_stream, n_own, d, x.stride(0), own.stride(0), d,
        split_len(n_stream, splits, t["loop"]), hp, **blocks, **const, **t["kw"])
    return part[0] if splits == 1 else part.sum(0)


def merge_states(state):
    """(pos, neg) log(1 + Σ) per proxy from the forward's (4, S, C) states, one launch."""
    c = state.shape[2]
    pos, neg = state.new_empty(c), state.new_empty(c)  # apart: a custom op's outputs may
    # not alias one another
    block = max(16, min(1024, next_pow2(c)))
    _merge_lse_one_kernel[(triton.cdiv(c, block), 2)](
        state, pos, neg, state.shape[1], c, BLOCK_C=block, ACC=acc_dtype(state.dtype))
    return pos, neg


def _pa_fwd(x, p, labels, alpha, margin):
    B, C, D = x.shape[0], p.shape[0], x.shape[1]
    t = tile_config(x, C, B)
    n_col = triton.cdiv(C, t["own"])
    splits = stream_splits(n_col, B, C, x.device)
    state = x.new_empty(4, splits, C)  # (max, sum) of the positives, then of the negatives
    _pa_fwd_kernel[(n_col, splits)](
        x, p, labels, state, B, C, D, x.stride(0), p.stride(0),
        split_len(B, splits, t["loop"]), hyper(x, alpha, margin), BLOCK_C=t["own"],
        BLOCK_B=t["loop"], BLOCK_D=t["d"], **t["kw"])
    return merge_states(state)


def _pa_bwd(x, p, labels, gp, gn, lp, ln, alpha, margin, need_dx=True, need_dp=True):
    B, C, D = x.shape[0], p.shape[0], x.shape[1]
    dx = dp = None
    stats = (gp, gn, lp, ln)
    hp = hyper(x, alpha, margin)
    if need_dx:
        dx = torch.empty_like(x)
        t = tile_config(x, B, C, grad=True)
        _pa_dx_kernel[_grids(B, D, t)](
            x, p, labels, *stats, dx, B, C, D, x.stride(0), p.stride(0), dx.stride(0), hp,
            BLOCK_B=t["own"], BLOCK_C=t["loop"], BLOCK_D=t["d"], BLOCK_DO=t["out"], **t["kw"])
    if need_dp:
        dp = column_grads(_pa_dp_kernel, x, p, (x, p, labels, *stats), hp, ("BLOCK_C", "BLOCK_B"))
    return dx, dp


# The launches are torch.library custom ops (fake kernels and autograd registered here), so
# that torch.compile(fullgraph=True) traces the module around them, as the pair losses'.
_FWD = "metrix_ops::triton_proxy_anchor_terms"


@triton_op(_FWD)
def _pa_terms_op(x: torch.Tensor, p: torch.Tensor, labels: torch.Tensor, alpha: float,
                 margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-proxy (pos, neg), the CPU op's proxy_anchor_fwd on Triton. The terms are also the
    log-sum-exps the backward needs, so nothing else is saved."""
    x, p, labels = x.contiguous(), p.contiguous(), labels.contiguous()
    check_unit_inputs(x, p, labels)
    return _pa_fwd(x, p, labels, alpha, margin)


@_pa_terms_op.register_fake
def _(x, p, labels, alpha, margin):
    return p.new_empty(p.shape[0]), p.new_empty(p.shape[0])


@triton_op("metrix_ops::triton_proxy_anchor_terms_bwd")
def _pa_terms_bwd_op(g_pos: torch.Tensor, g_neg: torch.Tensor, x: torch.Tensor,
                     p: torch.Tensor, labels: torch.Tensor, pos: torch.Tensor,
                     neg: torch.Tensor, alpha: float, margin: float, need_dx: bool,
                     need_dp: bool) -> tuple[torch.Tensor, torch.Tensor]:
    dx, dp = _pa_bwd(x, p, labels, g_pos.to(pos.dtype).contiguous(),
                     g_neg.to(neg.dtype).contiguous(), pos, neg, alpha, margin,
                     need_dx=need_dx, need_dp=need_dp)
    return (x.new_empty(0) if dx is None else dx), (p.new_empty(0) if dp is None else dp)


@_pa_terms_bwd_op.register_fake
def _(g_pos, g_neg, x, p, labels, pos, neg, alpha, margin, need_dx, need_dp):
    return (torch.empty_like(x) if need_dx else x.new_empty(0),
            torch.empty_like(p) if need_dp else p.new_empty(0))


def _pa_setup(ctx, inputs, output):
    x, p, labels, alpha, margin = inputs
    ctx.save_for_backward(x.contiguous(), p.contiguous(), labels.contiguous(), *output)
    ctx.args = (alpha, margin)


def _pa_backward(ctx, g_pos, g_neg):
    x, p, labels, pos, neg = ctx.saved_tensors
    g_pos = torch.zeros_like(pos) if g_pos is None else g_pos
    g_neg = torch.zeros_like(neg) if g_neg is None else g_neg
    need_dx, need_dp = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx, dp = torch.ops.metrix_ops.triton_proxy_anchor_terms_bwd(
        g_pos, g_neg, x, p, labels, pos, neg, *ctx.args, need_dx, need_dp)
    return (dx if need_dx else None), (dp if need_dp else None), None, None, None


register_autograd(_FWD, _pa_backward, setup_context=_pa_setup)


def proxy_anchor_terms(x_unit, p_unit, labels, alpha: float, margin: float):
    """Per-proxy (pos, neg): log(1 + Σ_{y=c} e^{−α(s−δ)}) and log(1 + Σ_{y≠c} e^{α(s+δ)})."""
    return call(torch.ops.metrix_ops.triton_proxy_anchor_terms, x_unit, p_unit, labels,
                float(alpha), float(margin))


def supports(params, inp, expansion) -> bool:
    """As the CPU op (cosine, no indices_tuple, no expansion, no ref_emb), minus the
    compiled-extension requirement."""
    return (HAS_TRITON and expansion is None and inp.indices_tuple is None
            and is_cosine(inp.distance) and inp.labels is not None
            and inp.ref_emb is inp.embeddings)


def impl(params, inp, reducer):
    """The CPU path's loss dict (metrix_ops/fused/proxy_anchor.py), terms from Triton."""
    return terms_impl(proxy_anchor_terms, params, inp, reducer)


if HAS_TRITON:
    from ..fused import register

    register("triton", "ProxyAnchorLoss", supports, impl)
