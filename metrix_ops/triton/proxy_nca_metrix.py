"""ProxyNCALoss with embedding-level Metrix on the Triton engine: per row u, the sum over its
candidates mix(u, w) (w ≠ u of another label, or of the same label for pairs="pos_pos") of
the soft-target cross-entropy over the proxies (common/proxy_metrix.h, the CPU op's
proxy_nca_metrix_fwd; reference/metrix_soft_forms.proxy_nca_soft):

    ℓ(u, w) = lse_c logit(s̃_c) − λ logit(s̃_{y_u}) − (1−λ) logit(s̃_{y_w}),
    s̃_c = r_uw (λ s_uc + (1−λ) s_wc),  r_uw = 1/max(√(c0 + c1 g_uw), ε),

logit = scale·s̃ (cosine) or −scale·max(2 − 2s̃, 0) (PML's squared L2 of unit vectors). The
glue (fused/proxy_metrix.nca_mixed, shared with the CPU engine) divides the rows' total by
the number of candidates.

Layout: row programs over BLOCK_U rows u stream tiles of partners w (their Gram tile g_uw by
tl.dot) and, inside, proxy tiles (s_uc and s_wc loaded from S_P = X Pᵀ, one matmul before the
kernel: proxy_sims); the BLOCK_U×BLOCK_W×BLOCK_C candidate-logit tensor folds into an
online log-sum-exp per candidate. No K×C matrix (K ≈ B² candidates), no mixed point.

Backward, by the same row programs: the candidate set is symmetric (w is a candidate partner
of u iff u is one of w), so a program handles both orders (u, w) and (w, u) of its rows and
writes only its own rows: per candidate a first sweep over the proxies for its lse, a second
for the weights q_c = g·(softmax_c − y_c)·dlogit/ds̃, which go to s_uc (λ r q, or (1−λ) r q
for the second order), into a B×C table ∂L/∂S_P that the program owning the row updates in
place (no atomics), and to g_uw (Σ_c q_c s̃_c · ∂r/∂g / r), whose product with X_W is added
to dX_u in the program. Then dX += (∂L/∂S_P) P and dP = (∂L/∂S_P)ᵀ X in PyTorch. Memory:
the B×C tables S_P and ∂L/∂S_P (the clean loss's logits' size) beside O((B + C)·D)."""
from __future__ import annotations

import torch

from ..ops.autograd import call, register_autograd
import triton
import triton.language as tl

from .. import fused
from ..fused import proxy_metrix
from ..ops.proxy_nca import COSINE, SQUARED_L2
from .launch import next_pow2, triton_op
from .proxy_anchor import check_unit_inputs, hyper
from .proxy_nca import impl as clean_impl, supports as clean_supports
from .tiles import acc_dtype, add_tile_product, dot_precision, load_rows, sim_tile


@triton.jit
def _mix_r(g, c0, c1):
    """1/‖λ x_u + (1−λ) x_w‖ from g_uw, the norm clamped at EPS as the reference's mix_norm;
    and its slope factor ∂r/∂g / r = −(c1/2) r² (0 where clamped)."""
    n = tl.sqrt(tl.maximum(c0 + c1 * g, 0.0))
    r = 1.0 / tl.maximum(n, 1e-12)
    return r, tl.where(n > 1e-12, -0.5 * c1 * r * r, 0.0)


@triton.jit
def _nca_logit3(v, scale, KIND: tl.constexpr):
    if KIND == 0:
        return scale * v
    else:
        return -scale * tl.maximum(2.0 - 2.0 * v, 0.0)


@triton.jit
def _nca_dlogit3(v, scale, eps16, KIND: tl.constexpr):
    """dlogit/ds̃: scale, or 2·scale (0 for coincident points, 2 − 2s̃ below 16 eps)."""
    if KIND == 0:
        return tl.zeros_like(v) + scale
    else:
        return tl.where(2.0 - 2.0 * v < eps16, 0.0, 2.0 * scale)


@triton.jit
def _pair_tile(x_ptr, y_ptr, offs_u, offs_w, yu, B, D, stride_x, prm_ptr, SAME: tl.constexpr,
               BLOCK_U: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr,
               ACC: tl.constexpr, PRECISION: tl.constexpr):
    """The partners' labels, the candidate mask, r_uw and its slope factor of a (U, W) tile."""
    c0, c1 = tl.load(prm_ptr + 2), tl.load(prm_ptr + 3)
    w_ok = offs_w < B
    yw = tl.load(y_ptr + offs_w, mask=w_ok, other=-1)
    g = sim_tile(x_ptr, x_ptr, offs_u, offs_w, B, B, D, stride_x, stride_x, BLOCK_U, BLOCK_W,
                 BLOCK_D, ACC, PRECISION)
    valid = ((offs_u[:, None] < B) & w_ok[None, :] & (offs_u[:, None] != offs_w[None, :]))
    if SAME:
        valid = valid & (yu[:, None] == yw[None, :])
    else:
        valid = valid & (yu[:, None] != yw[None, :])
    r, nc = _mix_r(g, c0, c1)
    return yw, valid, r, nc


@triton.jit
def proxy_tile(sp_ptr, offs_u, offs_w, c0, B, C, stride_sp, BLOCK_C: tl.constexpr):
    """Proxy tile c0's offsets, their mask, and the rows' and partners' cosines to its proxies
    (tiles of S_P, 0 outside)."""
    offs_c = c0 + tl.arange(0, BLOCK_C)
    return (offs_c, offs_c < C, load_rows(sp_ptr, offs_u, B, offs_c, C, stride_sp),
            load_rows(sp_ptr, offs_w, B, offs_c, C, stride_sp))


@triton.jit
def _lse_sweep(sp_ptr, offs_u, offs_w, yu, yw, r, lam, scale, B, C, stride_sp,
               KIND: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_W: tl.constexpr,
               BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """Per candidate (u first: weight λ on s_u·) over every proxy: the log-sum-exp of its
    logits, and its target λ logit(s̃_{y_u}) + (1−λ) logit(s̃_{y_w}) (BLOCK_U × BLOCK_W)."""
    m = tl.full((BLOCK_U, BLOCK_W), float("-inf"), ACC)
    t = tl.zeros((BLOCK_U, BLOCK_W), ACC)
    tgt = tl.zeros((BLOCK_U, BLOCK_W), ACC)
    for c0 in range(0, C, BLOCK_C):
        offs_c, _c_ok, su, sw = proxy_tile(sp_ptr, offs_u, offs_w, c0, B, C, stride_sp, BLOCK_C)
        v = r[:, :, None] * (lam * su[:, None, :] + (1 - lam) * sw[None, :, :])
        lg = tl.where((offs_c < C)[None, None, :], _nca_logit3(v, scale, KIND), float("-inf"))
        m_new = tl.maximum(m, tl.max(lg, axis=2))  # finite: every candidate has C ≥ 1 logits
        t = t * tl.exp(m - m_new) + tl.sum(tl.exp(lg - m_new[:, :, None]), axis=2)
        m = m_new
        cc = offs_c[None, None, :]
        # selected first, then weighted: λ = 0 must not meet the −inf of padded proxies
        tgt += (lam * tl.sum(tl.where(cc == yu[:, None, None], lg, 0.0), axis=2)
                + (1 - lam) * tl.sum(tl.where(cc == yw[None, :, None], lg, 0.0), axis=2))
    return m + tl.log(t), tgt


@triton.jit
def _nca_mix_fwd_kernel(x_ptr, sp_ptr, y_ptr, prm_ptr, rows_ptr, B, C, D, stride_x, stride_sp,
                        SAME: tl.constexpr, KIND: tl.constexpr, BLOCK_U: tl.constexpr,
                        BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                        ACC: tl.constexpr, PRECISION: tl.constexpr):
    offs_u = tl.program_id(0) * BLOCK_U + tl.arange(0, BLOCK_U)
    u_ok = offs_u < B
    yu = tl.load(y_ptr + offs_u, mask=u_ok, other=-1)
    lam, scale = tl.load(prm_ptr), tl.load(prm_ptr + 1)
    rows = tl.zeros((BLOCK_U,), ACC)
    for w0 in range(0, B, BLOCK_W):
        offs_w = w0 + tl.arange(0, BLOCK_W)
        yw, valid, r, _ = _pair_tile(x_ptr, y_ptr, offs_u, offs_w, yu, B, D, stride_x, prm_ptr,
                                     SAME, BLOCK_U, BLOCK_W, BLOCK_D, ACC, PRECISION)
        lse, tgt = _lse_sweep(sp_ptr, offs_u, offs_w, yu, yw, r, lam, scale, B, C, stride_sp,
                              KIND, BLOCK_U, BLOCK_W, BLOCK_C, ACC)
        rows += tl.sum(tl.where(valid, lse - tgt, 0.0), axis=1)
    tl.store(rows_ptr + offs_u, rows, mask=u_ok)


@triton.jit
def _nca_mix_bwd_kernel(x_ptr, sp_ptr, y_ptr, prm_ptr, g_ptr, dsp_ptr, dx_ptr, B, C, D,
                        stride_x, stride_sp, stride_dsp, stride_dx, SAME: tl.constexpr,
                        KIND: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_W: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
                        ACC: tl.constexpr, PRECISION: tl.constexpr):
    """Rows u own: ∂L/∂S_P[u, :] (read-modify-write of their own rows of the table) and the
    g_uw part of dX_u, over both orders (u, w) (weight g_u) and (w, u) (weight g_w)."""
    offs_u = tl.program_id(0) * BLOCK_U + tl.arange(0, BLOCK_U)
    u_ok = offs_u < B
    yu = tl.load(y_ptr + offs_u, mask=u_ok, other=-1)
    gu = tl.load(g_ptr + offs_u, mask=u_ok, other=0.0).to(ACC)
    lam, scale, eps16 = tl.load(prm_ptr), tl.load(prm_ptr + 1), tl.load(prm_ptr + 4)
    acc = tl.zeros((BLOCK_U, BLOCK_DO), ACC)
    for w0 in range(0, B, BLOCK_W):
        offs_w = w0 + tl.arange(0, BLOCK_W)
        yw, valid, r, nc = _pair_tile(x_ptr, y_ptr, offs_u, offs_w, yu, B, D, stride_x,
                                      prm_ptr, SAME, BLOCK_U, BLOCK_W, BLOCK_D, ACC, PRECISION)
        gw = tl.load(g_ptr + offs_w, mask=offs_w < B, other=0.0).to(ACC)
        # (u, w): λ on s_u·; (w, u): λ on s_w·, i.e. (1 − λ) on s_u·
        lse1, _ = _lse_sweep(sp_ptr, offs_u, offs_w, yu, yw, r, lam, scale, B, C, stride_sp,
                             KIND, BLOCK_U, BLOCK_W, BLOCK_C, ACC)
        lse2, _ = _lse_sweep(sp_ptr, offs_u, offs_w, yu, yw, r, 1 - lam, scale, B, C,
                             stride_sp, KIND, BLOCK_U, BLOCK_W, BLOCK_C, ACC)
        w1 = tl.where(valid, gu[:, None], 0.0)
        w2 = tl.where(valid, gw[None, :], 0.0)
        dg = tl.zeros((BLOCK_U, BLOCK_W), ACC)
        for c0 in range(0, C, BLOCK_C):
            offs_c, c_ok, su, sw = proxy_tile(sp_ptr, offs_u, offs_w, c0, B, C, stride_sp,
                                              BLOCK_C)
            cc = offs_c[None, None, :]
            is_u = (cc == yu[:, None, None]).to(ACC)
            is_w = (cc == yw[None, :, None]).to(ACC)
            v1 = r[:, :, None] * (lam * su[:, None, :] + (1 - lam) * sw[None, :, :])
            v2 = r[:, :, None] * ((1 - lam) * su[:, None, :] + lam * sw[None, :, :])
            sm1 = tl.exp(_nca_logit3(v1, scale, KIND) - lse1[:, :, None])
            sm2 = tl.exp(_nca_logit3(v2, scale, KIND) - lse2[:, :, None])
            q1 = w1[:, :, None] * (sm1 - (lam * is_u + (1 - lam) * is_w)) \
                * _nca_dlogit3(v1, scale, eps16, KIND)
            q2 = w2[:, :, None] * (sm2 - (lam * is_w + (1 - lam) * is_u)) \
                * _nca_dlogit3(v2, scale, eps16, KIND)
            q1 = tl.where(c_ok[None, None, :], q1, 0.0)
            q2 = tl.where(c_ok[None, None, :], q2, 0.0)
            # ∂L/∂s_uc of both orders, added to this program's own rows of the table
            d_su = tl.sum(r[:, :, None] * (lam * q1 + (1 - lam) * q2), axis=1)
            ptrs = dsp_ptr + offs_u[:, None] * stride_dsp + offs_c[None, :]
            m2 = u_ok[:, None] & c_ok[None, :]
            tl.store(ptrs, tl.load(ptrs, mask=m2, other=0.0) + d_su, mask=m2)
            dg += tl.sum(q1 * v1 + q2 * v2, axis=2)
        acc = add_tile_product(acc, dg * nc, x_ptr, offs_w, B, D, stride_x, BLOCK_DO, PRECISION)
    offs_d = tl.arange(0, BLOCK_DO)
    tl.store(dx_ptr + offs_u[:, None] * stride_dx + offs_d[None, :], acc,
             mask=u_ok[:, None] & (offs_d[None, :] < D))


def proxy_sims(x, p):
    """S_P = X Pᵀ (B × C) in the accumulation dtype, by one matmul before the candidate
    kernels, which then load its tiles. Every candidate tile reads s_uc and s_wc for each
    proxy tile; recomputing them by tl.dot there cost D/8 multiply-adds per candidate term
    with 16-wide tiles (B²·C·D/4 flops a proxy sweep, 8.8·10¹² at B = 8192, C = 1024,
    D = 512, by arithmetic; the NCA backward sweeps three times) where a term itself takes a
    few flops and an exp. The table is B·C, the size of the backward's ∂L/∂S_P. Halves are
    widened first, as tl.dot accumulated them in fp32; fp32 follows torch's TF32 setting as
    PRECISION does."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (x.to(acc) @ p.to(acc).t()).contiguous()


def proxy_mix_config(x, c):
    """Rows per program, partners and proxies per tile of the proxy losses' Metrix kernels:
    the candidate tensor is BLOCK_U × BLOCK_W × BLOCK_C (4K entries on a GPU, up to 16K under
    the interpreter, where fewer, larger tiles run faster). 8 warps on a GPU: ptxas on sm_90
    (benchmarks/triton_spills.py, D = 512, with S_P loaded) gives the forwards no spills
    (NCA 175 registers, ProxyAnchor 242; 4 warps: NCA 28 B) and the backwards 64–76 B
    (4 warps: 1.1–1.3 KB per thread, mostly the 16 × D dX accumulator)."""
    dev, d = x.device, x.shape[1]
    if dev.type == "cuda":
        bu, bw, bc, warps = 16, 16, 16, dict(num_warps=8)
    else:
        bu = bw = 16
        bc, warps = max(16, min(64, next_pow2(c))), {}
    return dict(BLOCK_U=bu, BLOCK_W=bw, BLOCK_C=bc, BLOCK_D=max(16, min(64, next_pow2(d))),
                ACC=acc_dtype(x.dtype), PRECISION=dot_precision(x.dtype, dev)), warps


def _constants(x, scale, lam):
    # λ, scale, c0 = λ² + (1−λ)², c1 = 2λ(1−λ), and the coincidence bound 16 eps
    return hyper(x, lam, scale, lam * lam + (1 - lam) * (1 - lam), 2 * lam * (1 - lam),
                 16 * torch.finfo(x.dtype).eps)


_FWD = "metrix_ops::triton_proxy_nca_metrix_rows"


@triton_op(_FWD)
def _nca_mix_op(x: torch.Tensor, p: torch.Tensor, labels: torch.Tensor, scale: float,
                kind: int, lam: float, same: bool) -> torch.Tensor:
    """Per row u: Σ over its candidates mix(u, w) of the soft-target cross-entropy."""
    x, p, labels = x.contiguous(), p.contiguous(), labels.contiguous()
    check_unit_inputs(x, p, labels)
    if kind not in (COSINE, SQUARED_L2):
        raise ValueError(f"kind must be {COSINE} or {SQUARED_L2}, got {kind}")
    b = x.shape[0]
    rows = torch.zeros(b, dtype=x.dtype, device=x.device)
    if b > 0:
        cfg, warps = proxy_mix_config(x, p.shape[0])
        sp = proxy_sims(x, p)
        _nca_mix_fwd_kernel[(triton.cdiv(b, cfg["BLOCK_U"]),)](
            x, sp, labels, _constants(x, scale, lam), rows, b, p.shape[0], x.shape[1],
            x.stride(0), sp.stride(0), SAME=bool(same), KIND=int(kind), **cfg, **warps)
    return rows


@_nca_mix_op.register_fake
def _(x, p, labels, scale, kind, lam, same):
    return x.new_empty(x.shape[0])


@triton_op("metrix_ops::triton_proxy_nca_metrix_rows_bwd")
def _nca_mix_bwd_op(g_rows: torch.Tensor, x: torch.Tensor, p: torch.Tensor,
                    labels: torch.Tensor, scale: float, kind: int, lam: float, same: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    x, p, labels = x.contiguous(), p.contiguous(), labels.contiguous()
    b, c, d = x.shape[0], p.shape[0], x.shape[1]
    dx = torch.zeros_like(x)
    dsp = torch.zeros(b, c, dtype=x.dtype, device=x.device)
    if b > 0:
        cfg, warps = proxy_mix_config(x, c)
        sp = proxy_sims(x, p)
        _nca_mix_bwd_kernel[(triton.cdiv(b, cfg["BLOCK_U"]),)](
            x, sp, labels, _constants(x, scale, lam), g_rows.to(x.dtype).contiguous(), dsp, dx,
            b, c, d, x.stride(0), sp.stride(0), dsp.stride(0), dx.stride(0), SAME=bool(same),
            KIND=int(kind), BLOCK_DO=max(16, next_pow2(d)), **cfg, **warps)
    return dx + dsp @ p, dsp.t() @ x


@_nca_mix_bwd_op.register_fake
def _(g_rows, x, p, labels, scale, kind, lam, same):
    return torch.empty_like(x), torch.empty_like(p)


def _setup(ctx, inputs, output):
    x, p, labels, *args = inputs
    ctx.save_for_backward(x, p, labels)
    ctx.args = tuple(args)


def _backward(ctx, g_rows):
    x, p, labels = ctx.saved_tensors
    dx, dp = torch.ops.metrix_ops.triton_proxy_nca_metrix_rows_bwd(g_rows, x, p, labels,
                                                                   *ctx.args)
    return dx, dp, None, None, None, None, None


register_autograd(_FWD, _backward, setup_context=_setup)


def proxy_nca_metrix_rows_triton(x_unit, p_unit, labels, scale: float, kind: int, lam: float,
                                 same_label: bool, chunk=None):
    """The Triton twin of ops.proxy_metrix.proxy_nca_metrix_rows (chunk: unused)."""
    return call(torch.ops.metrix_ops.triton_proxy_nca_metrix_rows,
        x_unit, p_unit, labels, float(scale), int(kind), float(lam), bool(same_label))


def metrix_supports(params, inp, expansion, metrix) -> bool:
    return clean_supports(params, inp, expansion) and metrix.level == "embedding"


def metrix_impl(params, inp, reducer, metrix, lam: float):
    mixed = proxy_metrix.nca_mixed(params, inp, metrix.pairs, lam,
                                   rows_fn=proxy_nca_metrix_rows_triton)
    return clean_impl(params, inp, reducer) + metrix.weight * mixed


fused.register_metrix("triton", "ProxyNCALoss", metrix_supports, metrix_impl)
