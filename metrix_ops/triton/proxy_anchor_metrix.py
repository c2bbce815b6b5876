"""ProxyAnchorLoss with embedding-level Metrix on the Triton engine: per proxy c, over the
candidates mix(u, w) (w ≠ u of another label, or of the same label for pairs="pos_pos"),

    pos_c = log(1 + Σ_k y_kc e^{−α(s̃_kc − δ)}),   neg_c = log(1 + Σ_k (1 − y_kc) e^{α(s̃_kc + δ)}),

y_kc = λ[c = y_u] + (1−λ)[c = y_w] the candidate's class mass, s̃_kc = r_uw(λ s_uc + (1−λ) s_wc)
(common/proxy_metrix.h, the CPU op's proxy_anchor_metrix_fwd; reference
metrix_soft_forms.proxy_anchor_soft). The glue (fused/proxy_metrix.anchor_mixed, shared with
the CPU engine) applies the divisors.

A candidate's positive mass y_kc is 0 on every proxy but its two members' classes, so the
positive terms are O(B²), not O(B²·C): the kernels take them per (row, partner) pair (the
cosine to y_u or y_w gathered from S_P) and sweep the proxies for the negatives only, one exp
per candidate and proxy where the first form took two (ptxas for sm_90: MUFU.EX2 per 16
proxies of the sweep, per thread, 32 → 16 forward and 64 → 32 backward).

- forward: row programs. A program owns BLOCK_U rows u and streams every partner tile (g_uw
  by tl.dot, once). Its rows' positive terms (u's candidates (u, w) and (w, u) on y_u) fold
  into one online log-sum-exp per row; inside, every proxy tile: the candidates' cosines to
  the proxies as a BLOCK_U × BLOCK_W × BLOCK_C tensor from s_uc and s_wc loaded from
  S_P = X Pᵀ (one matmul before the kernel, proxy_nca_metrix.proxy_sims), folded per proxy
  into the negatives' online log-sum-exp, the class masses entering as log-weights (a
  select of scalar logs; the compiler had hoisted the first form's logs already). Each
  program keeps its per-proxy (max, sum) pairs in its own column of a 4 × (B/BLOCK_U) × C
  table (the rows' positive states merged into their classes' entries at the end), merged
  with the "1 +" term afterwards by the clean loss's merge kernel
  (proxy_anchor.merge_states). (Proxy programs, the first form, recomputed every Gram tile
  and every s_wc once per proxy tile, and filled only C/16 programs.)
- backward: row programs, as triton/proxy_nca_metrix.py's: each handles both orders (u, w)
  and (w, u) of its rows (the candidate set is symmetric), so it writes only its own rows:
  ∂L/∂s_uc into a B×C table, and the g_uw part of dX_u; the positive terms' weights per
  pair before the proxy sweep. Then dX += (∂L/∂S_P) P and dP = (∂L/∂S_P)ᵀ X in PyTorch.
  The per-proxy terms are their own log-sum-exps, so the backward needs nothing else from
  the forward."""
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
from .proxy_nca_metrix import _pair_tile, proxy_mix_config as _config, proxy_sims, proxy_tile
from .tiles import add_tile_product


@triton.jit
def _log_mass(m):
    """A class mass's log-weight, −inf where the mass is 0 (the term is absent)."""
    return tl.where(m > 0, tl.log(tl.where(m > 0, m, 1.0)), float("-inf"))


@triton.jit
def _neg_logw(is_u, is_w, at_u, at_w, at_both):
    """log(1 − y) of the candidates' class masses y on each proxy as a select of scalars:
    at_u on the first member's class, at_w on the second's, at_both where they are one
    class, 0 elsewhere (where every other proxy is)."""
    return tl.where(is_u, tl.where(is_w, at_both, at_u), tl.where(is_w, at_w, 0.0))


@triton.jit
def _own_class(sp_ptr, y, offs, n, C, stride_sp):
    """Rows' labels y as addresses (0 where out of range: such a row meets no proxy, as none
    equals it), and each row's cosine to its own class's proxy."""
    ya = tl.where((y >= 0) & (y < C), y, 0)
    return ya, tl.load(sp_ptr + offs * stride_sp + ya, mask=offs < n, other=0.0)


@triton.jit
def _pa_mix_fwd_kernel(x_ptr, sp_ptr, y_ptr, prm_ptr, state_ptr, B, C, D, stride_x, stride_sp,
                       SAME: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_W: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
                       PRECISION: tl.constexpr):
    """Program k owns row tile k's candidates (u in the tile, every partner w) and, per proxy,
    their running (max, sum) of the positive and of the negative exponents: state[:, k]
    (state 4 × T × C: mp, tp, mn, tn, as proxy_anchor.merge_states takes them), read and
    written by this program only. The maxima start at 0, the "1 +" term's exponent (the
    final shift is at least that), so a tile without candidates is no NaN.

    A candidate's positive mass sits on its members' classes only, so the positive terms are
    per row, not per proxy: row u's are its candidates (u, w) on y_u (mass λ, or 1 when w is
    of u's class) and (w, u) on y_u (mass 1 − λ, w of another class), one online
    log-sum-exp per row over the partner tiles, merged into the proxies at the end. Only the
    negatives take the rows × partners × proxies tile, one exp an entry (the first form
    took two)."""
    pid = tl.program_id(0)
    offs_u = pid * BLOCK_U + tl.arange(0, BLOCK_U)
    yu = tl.load(y_ptr + offs_u, mask=offs_u < B, other=-1)
    yua, s_uu = _own_class(sp_ptr, yu, offs_u, B, C, stride_sp)
    lam, alpha, margin = tl.load(prm_ptr), tl.load(prm_ptr + 1), tl.load(prm_ptr + 4)
    om = 1 - lam
    # log-weights: negatives of the candidate (u, w) (mass λ on y_u, 1 − λ on y_w) ...
    n_u, n_w, n_uw = _log_mass(1 - lam), _log_mass(1 - om), _log_mass(1 - (lam + om))
    # ... and positives on y_u: as first member (of another class / of one class), second
    p_first, p_one, p_second = _log_mass(lam), _log_mass(lam + om), _log_mass(om)
    part = state_ptr + pid * C
    step = tl.num_programs(0) * C  # from one of the four tables to the next
    m_row = tl.zeros((BLOCK_U,), ACC)
    t_row = tl.zeros((BLOCK_U,), ACC)
    for w0 in range(0, B, BLOCK_W):
        offs_w = w0 + tl.arange(0, BLOCK_W)
        # (the slope factor is the backward's; `_` must not be reused below: the compiler
        # sees a loop-carried variable change shape)
        yw, valid, r, _nc = _pair_tile(x_ptr, y_ptr, offs_u, offs_w, yu, B, D, stride_x,
                                       prm_ptr, SAME, BLOCK_U, BLOCK_W, BLOCK_D, ACC, PRECISION)
        s_wu = tl.load(sp_ptr + offs_w[None, :] * stride_sp + yua[:, None], mask=valid,
                       other=0.0)
        one = yu[:, None] == yw[None, :]
        a = tl.where(valid, -alpha * (r * (lam * s_uu[:, None] + om * s_wu) - margin)
                     + tl.where(one, p_one, p_first), float("-inf"))
        b = tl.where(valid & (yu[:, None] != yw[None, :]),
                     -alpha * (r * (om * s_uu[:, None] + lam * s_wu) - margin) + p_second,
                     float("-inf"))
        m_new = tl.maximum(m_row, tl.maximum(tl.max(a, axis=1), tl.max(b, axis=1)))
        t_row = (t_row * tl.exp(m_row - m_new) + tl.sum(tl.exp(a - m_new[:, None]), axis=1)
                 + tl.sum(tl.exp(b - m_new[:, None]), axis=1))
        m_row = m_new
        ok = valid[:, :, None]
        for c0 in range(0, C, BLOCK_C):
            offs_c, c_ok, su, sw = proxy_tile(sp_ptr, offs_u, offs_w, c0, B, C, stride_sp,
                                              BLOCK_C)
            cc = offs_c[None, None, :]
            v = r[:, :, None] * (lam * su[:, None, :] + om * sw[None, :, :])
            an = alpha * (v + margin) + _neg_logw(cc == yu[:, None, None],
                                                  cc == yw[None, :, None], n_u, n_w, n_uw)
            an = tl.where(ok, an, float("-inf"))
            mn = tl.load(part + 2 * step + offs_c, mask=c_ok, other=0.0)
            tn = tl.load(part + 3 * step + offs_c, mask=c_ok, other=0.0)
            mn_new = tl.maximum(mn, tl.max(tl.max(an, axis=1), axis=0))
            tn = tn * tl.exp(mn - mn_new) + tl.sum(tl.sum(tl.exp(an - mn_new[None, None, :]),
                                                          axis=1), axis=0)
            tl.store(part + 2 * step + offs_c, mn_new, mask=c_ok)
            tl.store(part + 3 * step + offs_c, tn, mask=c_ok)
    # the rows' positive states into their classes' entries (rows of one class merged)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        hit = yu[:, None] == offs_c[None, :]
        mp = tl.max(tl.where(hit, m_row[:, None], 0.0), axis=0)
        # (the exponent is 0 off the hits: a row's max over another class's may overflow)
        tp = tl.sum(tl.where(hit, t_row[:, None], 0.0)
                    * tl.exp(tl.where(hit, m_row[:, None] - mp[None, :], 0.0)), axis=0)
        tl.store(part + offs_c, mp, mask=offs_c < C)
        tl.store(part + step + offs_c, tp, mask=offs_c < C)


@triton.jit
def _pos_grad(gp, lp, v, logw, alpha, margin):
    """∂pos_c/∂s̃ · g_pos[c] of one candidate's positive term: −α e^{a⁺ − pos_c} g, a⁺ with
    its log-weight."""
    return gp * -alpha * tl.exp(-alpha * (v - margin) + logw - lp)


@triton.jit
def _pa_mix_bwd_kernel(x_ptr, sp_ptr, y_ptr, prm_ptr, gp_ptr, gn_ptr, pos_ptr, neg_ptr,
                       dsp_ptr, dx_ptr, B, C, D, stride_x, stride_sp, stride_dsp, stride_dx,
                       SAME: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_W: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
                       ACC: tl.constexpr, PRECISION: tl.constexpr):
    """Rows u own ∂L/∂S_P[u, :] (read-modify-write of their rows of the table) and the g_uw
    part of dX_u, over both candidate orders (u, w) and (w, u). The positive terms live on
    y_u and y_w only: their weights are computed per (u, w) before the proxy sweep (four
    exps a pair), their parts of dg there too, and their parts of ∂L/∂S_P selected into the
    sweep, so the rows × partners × proxies tile takes one exp per order (the negatives'),
    where the first form took two."""
    offs_u = tl.program_id(0) * BLOCK_U + tl.arange(0, BLOCK_U)
    u_ok = offs_u < B
    yu = tl.load(y_ptr + offs_u, mask=u_ok, other=-1)
    yua, s_uu = _own_class(sp_ptr, yu, offs_u, B, C, stride_sp)
    gp_u = tl.load(gp_ptr + yua, mask=u_ok, other=0.0).to(ACC)[:, None]
    lp_u = tl.load(pos_ptr + yua, mask=u_ok, other=0.0).to(ACC)[:, None]
    lam, alpha, margin = tl.load(prm_ptr), tl.load(prm_ptr + 1), tl.load(prm_ptr + 4)
    om = 1 - lam
    # (u, w) has masses λ on y_u and 1 − λ on y_w; (w, u) 1 − λ on y_u and λ on y_w
    l_lam, l_om, l_one = _log_mass(lam), _log_mass(om), _log_mass(lam + om)
    n1_u, n1_w, n1_uw = _log_mass(1 - lam), _log_mass(1 - om), _log_mass(1 - (lam + om))
    n2_u, n2_w, n2_uw = _log_mass(1 - om), _log_mass(1 - lam), _log_mass(1 - (om + lam))
    acc = tl.zeros((BLOCK_U, BLOCK_DO), ACC)
    for w0 in range(0, B, BLOCK_W):
        offs_w = w0 + tl.arange(0, BLOCK_W)
        yw, valid, r, nc = _pair_tile(x_ptr, y_ptr, offs_u, offs_w, yu, B, D, stride_x,
                                      prm_ptr, SAME, BLOCK_U, BLOCK_W, BLOCK_D, ACC, PRECISION)
        ywa, s_ww = _own_class(sp_ptr, yw, offs_w, B, C, stride_sp)
        w_ok = offs_w < B
        gp_w = tl.load(gp_ptr + ywa, mask=w_ok, other=0.0).to(ACC)[None, :]
        lp_w = tl.load(pos_ptr + ywa, mask=w_ok, other=0.0).to(ACC)[None, :]
        s_wu = tl.load(sp_ptr + offs_w[None, :] * stride_sp + yua[:, None], mask=valid,
                       other=0.0)
        s_uw = tl.load(sp_ptr + offs_u[:, None] * stride_sp + ywa[None, :], mask=valid,
                       other=0.0)
        diff = yu[:, None] != yw[None, :]
        at_u = valid & (yua == yu)[:, None]  # (y_u in range: a positive term exists)
        at_w = valid & diff & (ywa == yw)[None, :]
        # positives: (u, w) on y_u and y_w, (w, u) on y_u and y_w (one term where one class)
        v1u = r * (lam * s_uu[:, None] + om * s_wu)
        v2u = r * (om * s_uu[:, None] + lam * s_wu)
        v1w = r * (lam * s_uw + om * s_ww[None, :])
        v2w = r * (om * s_uw + lam * s_ww[None, :])
        p1u = tl.where(at_u, _pos_grad(gp_u, lp_u, v1u, tl.where(diff, l_lam, l_one), alpha,
                                       margin), 0.0)
        p2u = tl.where(at_u, _pos_grad(gp_u, lp_u, v2u, tl.where(diff, l_om, l_one), alpha,
                                       margin), 0.0)
        p1w = tl.where(at_w, _pos_grad(gp_w, lp_w, v1w, l_om, alpha, margin), 0.0)
        p2w = tl.where(at_w, _pos_grad(gp_w, lp_w, v2w, l_lam, alpha, margin), 0.0)
        # their parts of ∂L/∂s_uc: on y_u one entry a row, on y_w selected in the sweep
        own_u = tl.sum(r * (lam * p1u + om * p2u), axis=1)
        on_w = (r * (lam * p1w + om * p2w))[:, :, None]
        dg = p1u * v1u + p2u * v2u + p1w * v1w + p2w * v2w
        ok = valid[:, :, None]
        for c0 in range(0, C, BLOCK_C):
            offs_c, c_ok, su, sw = proxy_tile(sp_ptr, offs_u, offs_w, c0, B, C, stride_sp,
                                              BLOCK_C)
            gn = tl.load(gn_ptr + offs_c, mask=c_ok, other=0.0).to(ACC)[None, None, :]
            ln = tl.load(neg_ptr + offs_c, mask=c_ok, other=0.0).to(ACC)[None, None, :]
            cc = offs_c[None, None, :]
            is_u = cc == yu[:, None, None]
            is_w = cc == yw[None, :, None]
            # (u, w): λ on s_u·; (w, u): λ on s_w· (its first member is w)
            v1 = r[:, :, None] * (lam * su[:, None, :] + om * sw[None, :, :])
            v2 = r[:, :, None] * (om * su[:, None, :] + lam * sw[None, :, :])
            # ∂/∂s̃ of neg_c: α e^{a⁻ − neg_c} (the weight inside a⁻)
            keep = ok & c_ok[None, None, :]
            q1 = tl.where(keep, gn * alpha * tl.exp(
                alpha * (v1 + margin) + _neg_logw(is_u, is_w, n1_u, n1_w, n1_uw) - ln), 0.0)
            q2 = tl.where(keep, gn * alpha * tl.exp(
                alpha * (v2 + margin) + _neg_logw(is_u, is_w, n2_u, n2_w, n2_uw) - ln), 0.0)
            d_su = (tl.sum(r[:, :, None] * (lam * q1 + om * q2) + tl.where(is_w, on_w, 0.0),
                           axis=1)
                    + tl.where(yu[:, None] == offs_c[None, :], own_u[:, None], 0.0))
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
