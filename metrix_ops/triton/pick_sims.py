"""HPHN triplet's chosen distances from the mined picks, with their gradient, as one Triton
kernel each way: the GPU engines' form of the CPU op csrc/cpu/hphn_picks_cpu.cpp (same
inputs, outputs and rounding of λ; ops/hphn_picks.py documents the picks).

Per anchor b, picks [p, a_u, a_w, a_k, q_u, q_w, q_k] (−1: none, read as row 0, a throw-away
value whose upstream gradient is 0):

    pos[b]  = x̂_b · x̂_p,  or ‖x̂_b − x̂_p‖² (l2_pos: the difference, exact 0 for duplicates)
    s_an[b] = a · q / (‖a‖ ‖q‖),  a = lerp(x̂_aw, x̂_au, a_k/(n+1)), q likewise,

‖·‖ exactly 1 for an original (u = w) and √max(‖·‖², tiny) otherwise (its gradient 0 where the
clamp acts), λ on the reference's float64 grid k/(n+1) rounded to x's dtype, lerp in
torch.lerp's two-sided form. Sums in fp32 (fp64 for fp64 rows).

Why: in PyTorch (fused/hphn_triplet._pick_sims_torch) these B values took five B×D gathers,
two lerps, three row dots, norms and their backward, about 45 launches a call, each a fixed
cost on a GPU that the few B values never amortise. Here a program owns a block of anchors
and reads their six rows in place. The backward writes each anchor's six row gradients (to
b, p, a_u, a_w, q_u, q_w) into a 6B × D buffer, then one index_add sums them into dX: a row
may be picked by many anchors, so the rows have many writers (index_add is deterministic on
the CPU, and on CUDA under torch.use_deterministic_algorithms, as the PyTorch form's
index_select backward was)."""
from __future__ import annotations

import torch

from ..ops.autograd import call
from ..ops.hphn_picks import register_pick_sims_autograd
from .launch import HAS_TRITON, next_pow2, triton_op
from .tiles import acc_dtype

_FWD = "metrix_ops::triton_hphn_pick_sims"
_BWD = "metrix_ops::triton_hphn_pick_sims_bwd"
_SLOTS = 6  # rows an anchor's two values touch: b, p, a_u, a_w, q_u, q_w

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _picks(idx_ptr, anchors, in_b, n, DT: tl.constexpr, ACC: tl.constexpr):
        """The picks of the anchors: rows p, a_u, a_w, q_u, q_w (−1 read as 0) and λ_a, λ_q
        (k/(n+1) in float64, rounded to the rows' dtype DT, then ACC; k = −1 reads as 0).
        Half-precision DT goes through fp32: the interpreter's direct fp64 → bf16 cast gave
        wrong values (values k/(n+1), n < 2²³, round the same either way)."""
        base = idx_ptr + anchors.to(tl.int64) * 7
        p = tl.maximum(tl.load(base, mask=in_b, other=0), 0)
        au = tl.maximum(tl.load(base + 1, mask=in_b, other=0), 0)
        aw = tl.maximum(tl.load(base + 2, mask=in_b, other=0), 0)
        qu = tl.maximum(tl.load(base + 4, mask=in_b, other=0), 0)
        qw = tl.maximum(tl.load(base + 5, mask=in_b, other=0), 0)
        ka = tl.maximum(tl.load(base + 3, mask=in_b, other=0), 0)
        kq = tl.maximum(tl.load(base + 6, mask=in_b, other=0), 0)
        steps = (n + 1).to(tl.float64)
        la = (ka.to(tl.float64) / steps)
        lq = (kq.to(tl.float64) / steps)
        if ACC != tl.float64:
            la, lq = la.to(tl.float32), lq.to(tl.float32)
        return p, au, aw, qu, qw, la.to(DT).to(ACC), lq.to(DT).to(ACC)

    @triton.jit
    def _rows(x_ptr, rows, in_b, d0, D, stride, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = in_b[:, None] & (cols[None, :] < D)
        v = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride + cols[None, :], mask=mask,
                    other=0.0)
        return v.to(ACC)

    @triton.jit
    def _lerp(w, u, lam):
        """torch.lerp(w, u, λ): w + λ(u − w) for |λ| < 0.5, else u − (u − w)(1 − λ) (exact at
        λ = 1: u itself)."""
        lam = lam[:, None]
        return tl.where(tl.abs(lam) < 0.5, w + lam * (u - w), u - (u - w) * (1.0 - lam))

    @triton.jit
    def _features(x_ptr, anchors, in_b, p, au, aw, qu, qw, la, lq, d0, D, stride,
                  BLOCK_D: tl.constexpr, ACC: tl.constexpr):
        """Features [d0, d0 + BLOCK_D) of x̂_b, x̂_p and the points a, q."""
        xb = _rows(x_ptr, anchors, in_b, d0, D, stride, BLOCK_D, ACC)
        xp = _rows(x_ptr, p, in_b, d0, D, stride, BLOCK_D, ACC)
        a = _lerp(_rows(x_ptr, aw, in_b, d0, D, stride, BLOCK_D, ACC),
                  _rows(x_ptr, au, in_b, d0, D, stride, BLOCK_D, ACC), la)
        q = _lerp(_rows(x_ptr, qw, in_b, d0, D, stride, BLOCK_D, ACC),
                  _rows(x_ptr, qu, in_b, d0, D, stride, BLOCK_D, ACC), lq)
        return xb, xp, a, q

    @triton.jit
    def _sums(x_ptr, anchors, in_b, p, au, aw, qu, qw, la, lq, D, stride, L2_POS: tl.constexpr,
              BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
        """(pos, a·a, q·q, a·q) per anchor, over the features in blocks."""
        pos = tl.zeros((BLOCK_B,), ACC)
        aa = tl.zeros((BLOCK_B,), ACC)
        qq = tl.zeros((BLOCK_B,), ACC)
        aq = tl.zeros((BLOCK_B,), ACC)
        for d0 in range(0, D, BLOCK_D):
            xb, xp, a, q = _features(x_ptr, anchors, in_b, p, au, aw, qu, qw, la, lq, d0, D,
                                     stride, BLOCK_D, ACC)
            if L2_POS:
                diff = xb - xp
                pos += tl.sum(diff * diff, 1)
            else:
                pos += tl.sum(xb * xp, 1)
            aa += tl.sum(a * a, 1)
            qq += tl.sum(q * q, 1)
            aq += tl.sum(a * q, 1)
        return pos, aa, qq, aq

    @triton.jit
    def _norm(sq, u, w, TINY: tl.constexpr, ACC: tl.constexpr):
        """(‖v‖ of the point on rows u, w: exactly 1 for an original (u = w), else
        √max(‖v‖², tiny); whether it is differentiated: not for an original, nor where the
        clamp acts). (u != w, not ~(u == w): triton 3.2's interpreter cannot invert a bool.)"""
        tiny = tl.full((), TINY, ACC)
        return (tl.where(u == w, 1.0, tl.sqrt(tl.maximum(sq, tiny))),
                (u != w) & (sq >= tiny))

    @triton.jit
    def _pick_sims_fwd_kernel(x_ptr, idx_ptr, pos_ptr, san_ptr, B, D, stride, n,
                              L2_POS: tl.constexpr, TINY: tl.constexpr, DT: tl.constexpr,
                              BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
        anchors = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        in_b = anchors < B
        p, au, aw, qu, qw, la, lq = _picks(idx_ptr, anchors, in_b, n, DT, ACC)
        pos, aa, qq, aq = _sums(x_ptr, anchors, in_b, p, au, aw, qu, qw, la, lq, D, stride,
                                L2_POS, BLOCK_B, BLOCK_D, ACC)
        na, _ = _norm(aa, au, aw, TINY, ACC)
        nq, _ = _norm(qq, qu, qw, TINY, ACC)
        tl.store(pos_ptr + anchors, pos, mask=in_b)
        tl.store(san_ptr + anchors, aq / (na * nq), mask=in_b)

    @triton.jit
    def _pick_sims_bwd_kernel(gp_ptr, gs_ptr, x_ptr, idx_ptr, buf_ptr, dst_ptr, B, D, stride,
                              n, L2_POS: tl.constexpr, TINY: tl.constexpr, DT: tl.constexpr,
                              BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
                              ACC: tl.constexpr):
        """Per anchor its six row gradients into buf (6B × D, slot-major per anchor) and their
        rows into dst:
            b, p:      g_p x̂_p, g_p x̂_b   (cosine)  or  ±2 g_p (x̂_b − x̂_p)   (l2_pos)
            a_u, a_w:  λ_a, 1 − λ_a times ∂ = g_s (q / (‖a‖‖q‖) − [s/‖a‖²] a)
            q_u, q_w:  λ_q, 1 − λ_q times g_s (a / (‖a‖‖q‖) − [s/‖q‖²] q)
        ([·]: 0 where the norm is not differentiated)."""
        anchors = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        in_b = anchors < B
        p, au, aw, qu, qw, la, lq = _picks(idx_ptr, anchors, in_b, n, DT, ACC)
        gp = tl.load(gp_ptr + anchors, mask=in_b, other=0.0).to(ACC)
        gs = tl.load(gs_ptr + anchors, mask=in_b, other=0.0).to(ACC)
        _, aa, qq, aq = _sums(x_ptr, anchors, in_b, p, au, aw, qu, qw, la, lq, D, stride,
                              False, BLOCK_B, BLOCK_D, ACC)
        na, da = _norm(aa, au, aw, TINY, ACC)
        nq, dq = _norm(qq, qu, qw, TINY, ACC)
        inv = 1.0 / (na * nq)
        s = aq * inv
        ca = tl.where(da, s / (na * na), 0.0)
        cq = tl.where(dq, s / (nq * nq), 0.0)
        a64 = anchors.to(tl.int64)
        slot = dst_ptr + a64 * 6
        tl.store(slot, anchors.to(tl.int64), mask=in_b)
        tl.store(slot + 1, p, mask=in_b)
        tl.store(slot + 2, au, mask=in_b)
        tl.store(slot + 3, aw, mask=in_b)
        tl.store(slot + 4, qu, mask=in_b)
        tl.store(slot + 5, qw, mask=in_b)
        out = buf_ptr + a64[:, None] * (6 * D)
        for d0 in range(0, D, BLOCK_D):
            xb, xp, a, q = _features(x_ptr, anchors, in_b, p, au, aw, qu, qw, la, lq, d0, D,
                                     stride, BLOCK_D, ACC)
            cols = d0 + tl.arange(0, BLOCK_D)
            mask = in_b[:, None] & (cols[None, :] < D)
            if L2_POS:
                vb = (2.0 * gp)[:, None] * (xb - xp)
                vp = -vb
            else:
                vb = gp[:, None] * xp
                vp = gp[:, None] * xb
            d_a = gs[:, None] * (q * inv[:, None] - a * ca[:, None])
            d_q = gs[:, None] * (a * inv[:, None] - q * cq[:, None])
            tl.store(out + cols[None, :], vb, mask=mask)
            tl.store(out + D + cols[None, :], vp, mask=mask)
            tl.store(out + 2 * D + cols[None, :], la[:, None] * d_a, mask=mask)
            tl.store(out + 3 * D + cols[None, :], (1.0 - la)[:, None] * d_a, mask=mask)
            tl.store(out + 4 * D + cols[None, :], lq[:, None] * d_q, mask=mask)
            tl.store(out + 5 * D + cols[None, :], (1.0 - lq)[:, None] * d_q, mask=mask)


def _check(xu, idx):
    if xu.dim() != 2 or not xu.dtype.is_floating_point:
        raise ValueError(f"xu must be a 2-D float tensor, got {xu.dim()}-D {xu.dtype}")
    if idx.dtype != torch.long or tuple(idx.shape) != (xu.shape[0], 7):
        raise ValueError(f"idx must be int64 of shape ({xu.shape[0]}, 7), got "
                         f"{tuple(idx.shape)} {idx.dtype}")
    if idx.device != xu.device:
        raise ValueError(f"idx must be on xu's device {xu.device}, got {idx.device}")


def _launch(kernel, xu, *tensors, n: int, l2_pos: bool):
    """kernel(*tensors, B, D, xu's row stride, n) over blocks of 16 anchors, 32 features a
    step at most: six rows' tiles live at once, and ptxas for sm_90 (4 warps,
    benchmarks/triton_spills.py) spills 1.6–2.4 KB at 128, 0.1–0.3 KB at 64, none at 32."""
    b, d = xu.shape
    wide = xu.dtype == torch.float64
    kernel[(triton.cdiv(b, 16),)](
        *tensors, b, d, xu.stride(0), int(n), L2_POS=bool(l2_pos),
        TINY=torch.finfo(torch.float64 if wide else torch.float32).tiny,
        DT=getattr(tl, str(xu.dtype).split(".")[1]), BLOCK_B=16,
        BLOCK_D=max(16, min(32, next_pow2(d))), ACC=acc_dtype(xu.dtype))


def _unit_stride(t):
    return t if t.stride(1) == 1 else t.contiguous()


@triton_op(_FWD)
def _fwd_op(xu: torch.Tensor, idx: torch.Tensor, n_points: int, l2_pos: bool
            ) -> tuple[torch.Tensor, torch.Tensor]:
    _check(xu, idx)
    pos, san = xu.new_empty(xu.shape[0]), xu.new_empty(xu.shape[0])
    if xu.shape[0]:
        xu = _unit_stride(xu)
        _launch(_pick_sims_fwd_kernel, xu, xu, idx.contiguous(), pos, san, n=n_points,
                l2_pos=l2_pos)
    return pos, san


@_fwd_op.register_fake
def _(xu, idx, n_points, l2_pos):
    return xu.new_empty(xu.shape[0]), xu.new_empty(xu.shape[0])


@triton_op(_BWD)
def _bwd_op(grad_pos: torch.Tensor, grad_san: torch.Tensor, xu: torch.Tensor,
            idx: torch.Tensor, n_points: int, l2_pos: bool) -> torch.Tensor:
    _check(xu, idx)
    b, d = xu.shape
    dx = torch.zeros_like(xu)
    if b == 0:
        return dx
    xu = _unit_stride(xu)
    buf = torch.empty((b * _SLOTS, d), dtype=xu.dtype, device=xu.device)
    dst = torch.empty((b * _SLOTS,), dtype=torch.long, device=xu.device)
    _launch(_pick_sims_bwd_kernel, xu, grad_pos.to(xu.dtype).contiguous(),
            grad_san.to(xu.dtype).contiguous(), xu, idx.contiguous(), buf, dst, n=n_points,
            l2_pos=l2_pos)
    return dx.index_add_(0, dst, buf)


@_bwd_op.register_fake
def _(grad_pos, grad_san, xu, idx, n_points, l2_pos):
    return torch.empty_like(xu)


register_pick_sims_autograd(
    _FWD, lambda *args: torch.ops.metrix_ops.triton_hphn_pick_sims_bwd(*args))


def hphn_pick_sims_triton(xu: torch.Tensor, idx: torch.Tensor, n_points: int, l2_pos: bool):
    """ops.hphn_picks.hphn_pick_sims on the Triton engine: (pos, s_an) per anchor,
    differentiable in xu."""
    return call(torch.ops.metrix_ops.triton_hphn_pick_sims, xu, idx, int(n_points),
                bool(l2_pos))
