"""ProxyAnchorLoss with embedding-level Metrix on the Triton engine: per proxy c, over the
candidates mix(u, w) (w ≠ u of another label, or of the same label for pairs="pos_pos"),

    pos_c = log(1 + Σ_k y_kc e^{−α(s̃_kc − δ)}),   neg_c = log(1 + Σ_k (1 − y_kc) e^{α(s̃_kc + δ)}),

y_kc = λ[c = y_u] + (1−λ)[c = y_w] the candidate's class mass, s̃_kc = r_uw(λ s_uc + (1−λ) s_wc)
(common/proxy_metrix.h, the CPU op's proxy_anchor_metrix_fwd; reference
metrix_soft_forms.proxy_anchor_soft). The glue (fused/proxy_metrix.anchor_mixed, shared with
the CPU engine) applies the divisors.

- forward: row programs. A program owns BLOCK_U rows u and streams every partner tile (g_uw
  by tl.dot, once) and, inside, every proxy tile: the candidates' cosines to the proxies as a
  BLOCK_U × BLOCK_W × BLOCK_C tensor from s_uc and s_wc loaded from S_P = X Pᵀ (one matmul
  before the kernel, proxy_nca_metrix.proxy_sims), folded per proxy into two online
  log-sum-exps, the class masses entering as log-weights. Each program keeps its per-proxy
  (max, sum) pairs in its own column of a 4 × (B/BLOCK_U) × C table, merged with the "1 +"
  term afterwards by the clean loss's merge kernel (proxy_anchor.merge_states). (Proxy
  programs, the first form, recomputed every Gram tile and every s_wc once per proxy tile,
  and filled only C/16 programs.)
- backward: row programs, as triton/proxy_nca_metrix.py's: each handles both orders (u, w)
  and (w, u) of its rows (the candidate set is symmetric), so it writes only its own rows:
  ∂L/∂s_uc into a B×C table, and the g_uw part of dX_u. Then dX += (∂L/∂S_P) P and
  dP = (∂L/∂S_P)ᵀ X in PyTorch. The per-proxy terms are their own log-sum-exps, so the
  backward needs nothing else from the forward."""
from __future__ import annotations

import torch

from ..ops.autograd import call, register_autograd
import triton
import triton.language as tl

from .. import fused
from ..fused import proxy_metrix
from .launch import next_pow2, triton_op
from .proxy_anchor import check_unit_inputs, hyper, merge_states
from .proxy_anchor import impl as clean_impl, supports as clean_supports
from .proxy_nca_metrix import _pair_tile, proxy_mix_config as _config, proxy_sims
from .tiles import add_tile_product, load_rows


@triton.jit
def _pa_args(v, yu, yw, offs_c, lu, lw, alpha, margin):
    """The candidates' positive and negative exponents with their class masses as
    log-weights (−inf where a mass is 0), and the masses y = lu[c = y_u] + lw[c = y_w]
    (rows u on axis 0, partners w on axis 1)."""
    cc = offs_c[None, None, :]
    y = (lu * (cc == yu[:, None, None]).to(v.dtype)
         + lw * (cc == yw[None, :, None]).to(v.dtype))
    ap = tl.where(y > 0, -alpha * (v - margin) + tl.log(tl.where(y > 0, y, 1.0)), float("-inf"))
    an = tl.where(1 - y > 0, alpha * (v + margin) + tl.log(tl.where(1 - y > 0, 1 - y, 1.0)),
                  float("-inf"))
    return ap, an, y


@triton.jit
def _pa_mix_fwd_kernel(x_ptr, sp_ptr, y_ptr, prm_ptr, state_ptr, B, C, D, stride_x, stride_sp,
                       SAME: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_W: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
                       PRECISION: tl.constexpr):
    """Program k owns row tile k's candidates (u in the tile, every partner w) and, per proxy,
    their running (max, sum) of the positive and of the negative exponents: state[:, k]
    (state 4 × T × C: mp, tp, mn, tn, as proxy_anchor.merge_states takes them), read and
    written by this program only. The maxima start at 0, the "1 +" term's exponent (the
    final shift is at least that), so a tile without candidates is no NaN."""
    pid = tl.program_id(0)
    offs_u = pid * BLOCK_U + tl.arange(0, BLOCK_U)
    yu = tl.load(y_ptr + offs_u, mask=offs_u < B, other=-1)
    lam, alpha, margin = tl.load(prm_ptr), tl.load(prm_ptr + 1), tl.load(prm_ptr + 4)
    part = state_ptr + pid * C
    step = tl.num_programs(0) * C  # from one of the four tables to the next
    for w0 in range(0, B, BLOCK_W):
        offs_w = w0 + tl.arange(0, BLOCK_W)
        # (the slope factor is the backward's; `_` must not be reused below: the compiler
        # sees a loop-carried variable change shape)
        yw, valid, r, _nc = _pair_tile(x_ptr, y_ptr, offs_u, offs_w, yu, B, D, stride_x,
                                       prm_ptr, SAME, BLOCK_U, BLOCK_W, BLOCK_D, ACC, PRECISION)
        ok = valid[:, :, None]
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            c_ok = offs_c < C
            su = load_rows(sp_ptr, offs_u, B, offs_c, C, stride_sp)
            sw = load_rows(sp_ptr, offs_w, B, offs_c, C, stride_sp)
            v = r[:, :, None] * (lam * su[:, None, :] + (1 - lam) * sw[None, :, :])
            ap, an, _ = _pa_args(v, yu, yw, offs_c, lam, 1 - lam, alpha, margin)
            ap = tl.where(ok, ap, float("-inf"))
            an = tl.where(ok, an, float("-inf"))
            mp = tl.load(part + offs_c, mask=c_ok, other=0.0)
            tp = tl.load(part + step + offs_c, mask=c_ok, other=0.0)
            mn = tl.load(part + 2 * step + offs_c, mask=c_ok, other=0.0)
            tn = tl.load(part + 3 * step + offs_c, mask=c_ok, other=0.0)
            mp_new = tl.maximum(mp, tl.max(tl.max(ap, axis=1), axis=0))
            mn_new = tl.maximum(mn, tl.max(tl.max(an, axis=1), axis=0))
            tp = tp * tl.exp(mp - mp_new) + tl.sum(tl.sum(tl.exp(ap - mp_new[None, None, :]),
                                                          axis=1), axis=0)
            tn = tn * tl.exp(mn - mn_new) + tl.sum(tl.sum(tl.exp(an - mn_new[None, None, :]),
                                                          axis=1), axis=0)
            tl.store(part + offs_c, mp_new, mask=c_ok)
            tl.store(part + step + offs_c, tp, mask=c_ok)
            tl.store(part + 2 * step + offs_c, mn_new, mask=c_ok)
            tl.store(part + 3 * step + offs_c, tn, mask=c_ok)


@triton.jit
def _pa_mix_bwd_kernel(x_ptr, sp_ptr, y_ptr, prm_ptr, gp_ptr, gn_ptr, pos_ptr, neg_ptr,
                       dsp_ptr, dx_ptr, B, C, D, stride_x, stride_sp, stride_dsp, stride_dx,
                       SAME: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_W: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
                       ACC: tl.constexpr, PRECISION: tl.constexpr):
    """Rows u own ∂L/∂S_P[u, :] (read-modify-write of their rows of the table) and the g_uw
    part of dX_u, over both candidate orders (u, w) and (w, u)."""
    offs_u = tl.program_id(0) * BLOCK_U + tl.arange(0, BLOCK_U)
    u_ok = offs_u < B
    yu = tl.load(y_ptr + offs_u, mask=u_ok, other=-1)
    lam, alpha, margin = tl.load(prm_ptr), tl.load(prm_ptr + 1), tl.load(prm_ptr + 4)
    acc = tl.zeros((BLOCK_U, BLOCK_DO), ACC)
    for w0 in range(0, B, BLOCK_W):
        offs_w = w0 + tl.arange(0, BLOCK_W)
        yw, valid, r, nc = _pair_tile(x_ptr, y_ptr, offs_u, offs_w, yu, B, D, stride_x,
                                      prm_ptr, SAME, BLOCK_U, BLOCK_W, BLOCK_D, ACC, PRECISION)
        ok = valid[:, :, None]
        dg = tl.zeros((BLOCK_U, BLOCK_W), ACC)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            c_ok = offs_c < C
            gp = tl.load(gp_ptr + offs_c, mask=c_ok, other=0.0).to(ACC)[None, None, :]
            gn = tl.load(gn_ptr + offs_c, mask=c_ok, other=0.0).to(ACC)[None, None, :]
            lp = tl.load(pos_ptr + offs_c, mask=c_ok, other=0.0).to(ACC)[None, None, :]
            ln = tl.load(neg_ptr + offs_c, mask=c_ok, other=0.0).to(ACC)[None, None, :]
            su = load_rows(sp_ptr, offs_u, B, offs_c, C, stride_sp)
            sw = load_rows(sp_ptr, offs_w, B, offs_c, C, stride_sp)
            # (u, w): λ on s_u·; (w, u): λ on s_w· (its first member is w)
            v1 = r[:, :, None] * (lam * su[:, None, :] + (1 - lam) * sw[None, :, :])
            v2 = r[:, :, None] * ((1 - lam) * su[:, None, :] + lam * sw[None, :, :])
            ap1, an1, _ = _pa_args(v1, yu, yw, offs_c, lam, 1 - lam, alpha, margin)
            ap2, an2, _ = _pa_args(v2, yu, yw, offs_c, 1 - lam, lam, alpha, margin)
            # ∂/∂s̃ of pos_c and neg_c: −α e^{a⁺ − pos_c}, α e^{a⁻ − neg_c} (weights inside a)
            q1 = gp * -alpha * tl.exp(ap1 - lp) + gn * alpha * tl.exp(an1 - ln)
            q2 = gp * -alpha * tl.exp(ap2 - lp) + gn * alpha * tl.exp(an2 - ln)
            keep = ok & c_ok[None, None, :]
            q1 = tl.where(keep, q1, 0.0)
            q2 = tl.where(keep, q2, 0.0)
            d_su = tl.sum(r[:, :, None] * (lam * q1 + (1 - lam) * q2), axis=1)
            ptrs = dsp_ptr + offs_u[:, None] * stride_dsp + offs_c[None, :]
            m2 = u_ok[:, None] & c_ok[None, :]
            tl.store(ptrs, tl.load(ptrs, mask=m2, other=0.0) + d_su, mask=m2)
            dg += tl.sum(q1 * v1 + q2 * v2, axis=2)
        acc = add_tile_product(acc, dg * nc, x_ptr, offs_w, B, D, stride_x, BLOCK_DO, PRECISION)
    offs_d = tl.arange(0, BLOCK_DO)
    tl.store(dx_ptr + offs_u[:, None] * stride_dx + offs_d[None, :], acc,
             mask=u_ok[:, None] & (offs_d[None, :] < D))


def _constants(x, alpha, margin, lam):
    # λ, α, c0 = λ² + (1−λ)², c1 = 2λ(1−λ) (slots 2, 3 as _pair_tile reads them), δ
    return hyper(x, lam, alpha, lam * lam + (1 - lam) * (1 - lam), 2 * lam * (1 - lam), margin)


_FWD = "metrix_ops::triton_proxy_anchor_metrix_terms"


@triton_op(_FWD)
def _pa_mix_op(x: torch.Tensor, p: torch.Tensor, labels: torch.Tensor, alpha: float,
               margin: float, lam: float, same: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per proxy (pos, neg) over the mixed candidates."""
    x, p, labels = x.contiguous(), p.contiguous(), labels.contiguous()
    check_unit_inputs(x, p, labels)
    b, c = x.shape[0], p.shape[0]
    if c == 0 or b == 0:
        return tuple(torch.zeros(c, dtype=x.dtype, device=x.device) for _ in range(2))
    cfg, warps = _config(x, c)
    sp = proxy_sims(x, p)
    tiles = triton.cdiv(b, cfg["BLOCK_U"])
    # (max, sum) of the positives, then of the negatives, per row tile: merge_states' layout
    state = torch.zeros(4, tiles, c, dtype=sp.dtype, device=x.device)
    _pa_mix_fwd_kernel[(tiles,)](
        x, sp, labels, _constants(x, alpha, margin, lam), state, b, c, x.shape[1], x.stride(0),
        sp.stride(0), SAME=bool(same), **cfg, **warps)
    pos, neg = merge_states(state)
    return pos.to(x.dtype), neg.to(x.dtype)


@_pa_mix_op.register_fake
def _(x, p, labels, alpha, margin, lam, same):
    return p.new_empty(p.shape[0]), p.new_empty(p.shape[0])


@triton_op("metrix_ops::triton_proxy_anchor_metrix_terms_bwd")
def _pa_mix_bwd_op(g_pos: torch.Tensor, g_neg: torch.Tensor, x: torch.Tensor,
                   p: torch.Tensor, labels: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
                   alpha: float, margin: float, lam: float, same: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    x, p, labels = x.contiguous(), p.contiguous(), labels.contiguous()
    b, c, d = x.shape[0], p.shape[0], x.shape[1]
    dx = torch.zeros_like(x)
    dsp = torch.zeros(b, c, dtype=x.dtype, device=x.device)
    if b > 0 and c > 0:
        cfg, warps = _config(x, c)
        sp = proxy_sims(x, p)
        _pa_mix_bwd_kernel[(triton.cdiv(b, cfg["BLOCK_U"]),)](
            x, sp, labels, _constants(x, alpha, margin, lam), g_pos.to(x.dtype).contiguous(),
            g_neg.to(x.dtype).contiguous(), pos.contiguous(), neg.contiguous(), dsp, dx, b, c,
            d, x.stride(0), sp.stride(0), dsp.stride(0), dx.stride(0), SAME=bool(same),
            BLOCK_DO=max(16, next_pow2(d)), **cfg, **warps)
    return dx + dsp @ p, dsp.t() @ x


@_pa_mix_bwd_op.register_fake
def _(g_pos, g_neg, x, p, labels, pos, neg, alpha, margin, lam, same):
    return torch.empty_like(x), torch.empty_like(p)


def _setup(ctx, inputs, output):
    x, p, labels, *args = inputs
    ctx.save_for_backward(x, p, labels, *output)
    ctx.args = tuple(args)


def _backward(ctx, g_pos, g_neg):
    x, p, labels, pos, neg = ctx.saved_tensors
    g_pos = torch.zeros_like(pos) if g_pos is None else g_pos
    g_neg = torch.zeros_like(neg) if g_neg is None else g_neg
    dx, dp = torch.ops.metrix_ops.triton_proxy_anchor_metrix_terms_bwd(
        g_pos, g_neg, x, p, labels, pos, neg, *ctx.args)
    return dx, dp, None, None, None, None, None


register_autograd(_FWD, _backward, setup_context=_setup)


def proxy_anchor_metrix_terms_triton(x_unit, p_unit, labels, alpha: float, margin: float,
                                     lam: float, same_label: bool, chunk=None):
    """The Triton twin of ops.proxy_metrix.proxy_anchor_metrix_terms (chunk: unused)."""
    return call(torch.ops.metrix_ops.triton_proxy_anchor_metrix_terms,
        x_unit, p_unit, labels, float(alpha), float(margin), float(lam), bool(same_label))


def metrix_supports(params, inp, expansion, metrix) -> bool:
    return clean_supports(params, inp, expansion) and metrix.level == "embedding"


def metrix_impl(params, inp, reducer, metrix, lam: float):
    mixed = proxy_metrix.anchor_mixed(params, inp, metrix.pairs, lam,
                                      terms_fn=proxy_anchor_metrix_terms_triton)
    return clean_impl(params, inp, reducer) + metrix.weight * mixed


fused.register_metrix("triton", "ProxyAnchorLoss", metrix_supports, metrix_impl)
