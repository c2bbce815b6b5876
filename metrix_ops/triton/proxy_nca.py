"""ProxyNCALoss (and the ProxyNCA++ temperature) on the Triton engine: unit embeddings x (B×D)
against unit proxies p (C×D), S = x pᵀ streamed in tiles, never B×C in memory. The math is
the CPU op's (csrc/common/proxy_nca.h, csrc/cpu/proxy_nca_cpu.cpp): per example, the
softmax cross-entropy over the proxies' logits, logit = scale·s (cosine) or −scale·(2 − 2s)
(PML's default squared L2 of unit vectors); the glue is the CPU path's
(metrix_ops/fused/proxy_nca.py).

Program layout, per kernel, and why:
- forward: row programs. The statistics are per example (a row softmax over the proxies):
  a program owns a block of examples and streams every proxy tile through an online
  log-sum-exp, picking up the own-proxy logit on the way, so each row finishes in one program.
- backward dX = G p: row programs (G_ic = g_i·dlogit·(softmax_ic − [c = y_i]) needs row i's
  finished lse, loaded once per program); each dX row is accumulated in registers and
  written once.
- backward dP = Gᵀ x: column programs, G recomputed from tiles of Sᵀ = p xᵀ with the rows'
  lse and upstream gradients loaded along the streamed axis; each dP row written once.
Two gradient kernels and no atomics, for the reasons given in proxy_anchor.py (whose tile
helpers, block choice and D-split of the outputs these kernels share).
"""
from __future__ import annotations

import torch

from ..ops.autograd import call, register_autograd
from ..fused.proxy_nca import _kind, rows_impl
from ..ops.proxy_nca import COSINE, SQUARED_L2
from .launch import HAS_TRITON, triton_op
from .proxy_anchor import _grids, check_unit_inputs, column_grads, hyper, tile_config

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .proxy_anchor import online_lse, rows_product, store_rows
    from .tiles import sim_tile

    @triton.jit
    def _nca_logit(s, scale, KIND: tl.constexpr):
        if KIND == 0:  # COSINE
            return scale * s
        else:  # SQUARED_L2: −scale·‖x − p‖² of unit rows
            return -scale * (2.0 - 2.0 * s)

    @triton.jit
    def _nca_grad(s, own, valid, scale, dlogit, g, lse, KIND: tl.constexpr):
        """∂(g·row loss)/∂s of each entry (nca_grad of proxy_nca.h); g, lse broadcast along
        the example axis. softmax = e^{logit − lse} ≤ 1 up to rounding."""
        sm = tl.exp(_nca_logit(s, scale, KIND) - lse)
        return tl.where(valid, g * dlogit * (sm - tl.where(own, 1.0, 0.0)), 0.0)

    @triton.jit
    def _nca_fwd_kernel(x_ptr, p_ptr, y_ptr, rows_ptr, lse_ptr, B, C, D, stride_x, stride_p,
                        hp_ptr, KIND: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
                        BLOCK_D: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr):
        scale = tl.load(hp_ptr).to(ACC)
        offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        in_b = offs_b < B
        y = tl.load(y_ptr + offs_b, mask=in_b, other=-1)
        m = tl.zeros((BLOCK_B,), dtype=ACC) + float("-inf")
        l = tl.zeros((BLOCK_B,), dtype=ACC)
        own_logit = tl.zeros((BLOCK_B,), dtype=ACC)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            s = sim_tile(x_ptr, p_ptr, offs_b, offs_c, B, C, D, stride_x, stride_p,
                         BLOCK_B, BLOCK_C, BLOCK_D, ACC, PRECISION)
            logit = _nca_logit(s, scale, KIND)
            valid = in_b[:, None] & (offs_c < C)[None, :]
            m, l = online_lse(m, l, logit, valid)
            own = valid & (y[:, None] == offs_c[None, :])
            own_logit += tl.sum(tl.where(own, logit, 0.0), 1)
        log_l = tl.log(tl.where(in_b, l, 1.0))  # rows past B: no log(0)
        tl.store(lse_ptr + offs_b, m + log_l, mask=in_b)
        # (max − own) + log Σ, not lse − own: exactly 0 only where PML's own-proxy
        # probability rounds to 1 (common/proxy_nca.h, nca_row_loss)
        tl.store(rows_ptr + offs_b, (m - own_logit) + log_l, mask=in_b)

    @triton.jit
    def _nca_dx_kernel(x_ptr, p_ptr, y_ptr, g_ptr, lse_ptr, dx_ptr, B, C, D, stride_x,
                       stride_p, stride_dx, hp_ptr, KIND: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_DO: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr):
        scale, dlogit = tl.load(hp_ptr).to(ACC), tl.load(hp_ptr + 1).to(ACC)
        offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        offs_do = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
        in_b = offs_b < B
        y = tl.load(y_ptr + offs_b, mask=in_b, other=-1)
        g = tl.load(g_ptr + offs_b, mask=in_b, other=0.0).to(ACC)[:, None]
        lse = tl.load(lse_ptr + offs_b, mask=in_b, other=0.0).to(ACC)[:, None]
        acc = tl.zeros((BLOCK_B, BLOCK_DO), dtype=ACC)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            s = sim_tile(x_ptr, p_ptr, offs_b, offs_c, B, C, D, stride_x, stride_p,
                         BLOCK_B, BLOCK_C, BLOCK_D, ACC, PRECISION)
            valid = in_b[:, None] & (offs_c < C)[None, :]
            gt = _nca_grad(s, y[:, None] == offs_c[None, :], valid, scale, dlogit, g, lse, KIND)
            acc = rows_product(acc, gt, p_ptr, offs_c, C, offs_do, D, stride_p, PRECISION)
        store_rows(dx_ptr, acc, offs_b, B, offs_do, D, stride_dx)

    @triton.jit
    def _nca_dp_kernel(x_ptr, p_ptr, y_ptr, g_ptr, lse_ptr, dp_ptr, B, C, D, stride_x,
                       stride_p, stride_dp, split_len, hp_ptr, KIND: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_DO: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr):
        """Split program_id(2)'s part of dP (its examples only) into dp[split]."""
        scale, dlogit = tl.load(hp_ptr).to(ACC), tl.load(hp_ptr + 1).to(ACC)
        b_lo = tl.program_id(2) * split_len
        offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        offs_do = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
        in_c = offs_c < C
        acc = tl.zeros((BLOCK_C, BLOCK_DO), dtype=ACC)
        for b0 in range(b_lo, tl.minimum(b_lo + split_len, B), BLOCK_B):
            offs_b = b0 + tl.arange(0, BLOCK_B)
            in_b = offs_b < B
            st = sim_tile(p_ptr, x_ptr, offs_c, offs_b, C, B, D, stride_p, stride_x,
                          BLOCK_C, BLOCK_B, BLOCK_D, ACC, PRECISION)
            y = tl.load(y_ptr + offs_b, mask=in_b, other=-1)
            g = tl.load(g_ptr + offs_b, mask=in_b, other=0.0).to(ACC)[None, :]
            lse = tl.load(lse_ptr + offs_b, mask=in_b, other=0.0).to(ACC)[None, :]
            valid = in_c[:, None] & in_b[None, :]
            gt = _nca_grad(st, y[None, :] == offs_c[:, None], valid, scale, dlogit, g, lse, KIND)
            acc = rows_product(acc, gt, x_ptr, offs_b, B, offs_do, D, stride_x, PRECISION)
        store_rows(dp_ptr + tl.program_id(2) * C * stride_dp, acc, offs_c, C, offs_do, D,
                   stride_dp)


def _dlogit(scale: float, kind: int) -> float:
    """d(logit)/ds, constant in s (nca_dlogit of proxy_nca.h)."""
    return scale if kind == COSINE else 2.0 * scale


def _nca_fwd(x, p, labels, scale, kind):
    B, C, D = x.shape[0], p.shape[0], x.shape[1]
    rows, lse = x.new_empty(B), x.new_empty(B)
    t = tile_config(x, B, C)
    _nca_fwd_kernel[(triton.cdiv(B, t["own"]),)](
        x, p, labels, rows, lse, B, C, D, x.stride(0), p.stride(0), hyper(x, scale), KIND=kind,
        BLOCK_B=t["own"], BLOCK_C=t["loop"], BLOCK_D=t["d"], **t["kw"])
    return rows, lse


def _nca_bwd(x, p, labels, g, lse, scale, kind, need_dx=True, need_dp=True):
    B, C, D = x.shape[0], p.shape[0], x.shape[1]
    dx = dp = None
    hp = hyper(x, scale, _dlogit(float(scale), kind))
    if need_dx:
        dx = torch.empty_like(x)
        t = tile_config(x, B, C, grad=True)
        _nca_dx_kernel[_grids(B, D, t)](
            x, p, labels, g, lse, dx, B, C, D, x.stride(0), p.stride(0), dx.stride(0), hp,
            KIND=kind, BLOCK_B=t["own"], BLOCK_C=t["loop"], BLOCK_D=t["d"], BLOCK_DO=t["out"],
            **t["kw"])
    if need_dp:
        dp = column_grads(_nca_dp_kernel, x, p, (x, p, labels, g, lse), hp,
                          ("BLOCK_C", "BLOCK_B"), KIND=kind)
    return dx, dp


# The launches are torch.library custom ops (fake kernels and autograd registered here), so
# that torch.compile(fullgraph=True) traces the module around them, as the pair losses'.
_FWD = "metrix_ops::triton_proxy_nca_rows"


@triton_op(_FWD)
def _nca_rows_op(x: torch.Tensor, p: torch.Tensor, labels: torch.Tensor, scale: float,
                 kind: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example (lse − own logit, lse), the CPU op's proxy_nca_fwd on Triton; the lse is
    saved for the backward and not differentiable."""
    x, p, labels = x.contiguous(), p.contiguous(), labels.contiguous()
    check_unit_inputs(x, p, labels)
    if kind not in (COSINE, SQUARED_L2):
        raise ValueError(f"kind must be {COSINE} or {SQUARED_L2}, got {kind}")
    return _nca_fwd(x, p, labels, scale, kind)


@_nca_rows_op.register_fake
def _(x, p, labels, scale, kind):
    return x.new_empty(x.shape[0]), x.new_empty(x.shape[0])


@triton_op("metrix_ops::triton_proxy_nca_rows_bwd")
def _nca_rows_bwd_op(g: torch.Tensor, x: torch.Tensor, p: torch.Tensor, labels: torch.Tensor,
                     lse: torch.Tensor, scale: float, kind: int, need_dx: bool,
                     need_dp: bool) -> tuple[torch.Tensor, torch.Tensor]:
    dx, dp = _nca_bwd(x, p, labels, g.to(lse.dtype).contiguous(), lse, scale, kind,
                      need_dx=need_dx, need_dp=need_dp)
    return (x.new_empty(0) if dx is None else dx), (p.new_empty(0) if dp is None else dp)


@_nca_rows_bwd_op.register_fake
def _(g, x, p, labels, lse, scale, kind, need_dx, need_dp):
    return (torch.empty_like(x) if need_dx else x.new_empty(0),
            torch.empty_like(p) if need_dp else p.new_empty(0))


def _nca_setup(ctx, inputs, output):
    x, p, labels, scale, kind = inputs
    ctx.save_for_backward(x.contiguous(), p.contiguous(), labels.contiguous(), output[1])
    ctx.args = (scale, kind)
    ctx.mark_non_differentiable(output[1])


def _nca_backward(ctx, g_rows, _g_lse):
    x, p, labels, lse = ctx.saved_tensors
    g = torch.zeros_like(lse) if g_rows is None else g_rows
    need_dx, need_dp = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx, dp = torch.ops.metrix_ops.triton_proxy_nca_rows_bwd(g, x, p, labels, lse, *ctx.args,
                                                          need_dx, need_dp)
    return (dx if need_dx else None), (dp if need_dp else None), None, None, None


register_autograd(_FWD, _nca_backward, setup_context=_nca_setup)


def proxy_nca_rows(x_unit, p_unit, labels, scale: float, kind: int):
    """Per example: logsumexp over proxies of the logits − the logit of its own proxy."""
    return call(torch.ops.metrix_ops.triton_proxy_nca_rows, x_unit, p_unit, labels,
                float(scale), int(kind))[0]


def supports(params, inp, expansion) -> bool:
    """As the CPU op (cosine or PML's default squared L2, normalised proxies, no
    indices_tuple, expansion or ref_emb), minus the compiled-extension requirement."""
    return (HAS_TRITON and expansion is None and inp.indices_tuple is None
            and inp.labels is not None and _kind(inp.distance) is not None
            and inp.ref_emb is inp.embeddings
            and params.get("normalize_proxies") is not False)


def impl(params, inp, reducer):
    """The CPU path's loss dict (metrix_ops/fused/proxy_nca.py), rows from Triton."""
    return rows_impl(proxy_nca_rows, params, inp, reducer)


if HAS_TRITON:
    from ..fused import register

    register("triton", "ProxyNCALoss", supports, impl)
