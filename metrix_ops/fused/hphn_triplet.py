"""HPHNTripletLoss, clean (batch-hard) and with Embedding Expansion, through the fused CPU
mining op (against references, e.g. a CrossBatchMemory bank: the streamed batch-hard miner,
refs_impl): the op returns per anchor the farthest positive and the closest (anchor-side,
negative) point pair without gradient; those few distances are then recomputed with gradient
in closed form from gathered unit rows, as the reference recomputes its chosen pairs. Memory
O(B·D + chunk·B); no B×B gradient matrix, no B(n+1)-point stack."""
from __future__ import annotations

import torch

from .. import _ext
from ..distances import is_cosine, is_normalized_l2
from ..miners.batch_hard import batch_hard_streaming
from ..ops.ee_mining import all_segments, ee_hphn_mine
from ..ops.hphn_picks import hphn_pick_sims
from ..reducers import reduce_loss_dict
from ..reference.expansion_points import expansion_segments, safe_sqrt
from ..reference.hphn_triplet import hphn_terms
from ..ops.unit_rows import unit_rows, normalized
from . import register
from .triplet_margin import _with_exact_grad

CHUNK = 256  # rows of U = X̂_chunk X̂ᵀ per step (whole classes); tests set it small


def supports(params, inp, expansion) -> bool:
    d = inp.distance
    if not (_ext.HAS_EXT and inp.indices_tuple is None and inp.labels is not None
            and (is_cosine(d) or is_normalized_l2(d))):
        return False
    if inp.ref_emb is not inp.embeddings:
        # references (ref_emb, or CrossBatchMemory's bank): the clean loss, by refs_impl
        return expansion is None and inp.ref_labels is not None
    if not inp.same_set:
        return False
    # unnormalised synthetic points change L2 distances (not a function of the cosine)
    return expansion is None or expansion.normalize or expansion.n_points == 0 or is_cosine(d)


def _dot(a, b):
    return (a * b).sum(1)


def _point_norm(pt, same):
    """‖pt‖ of points given by their rows; 1 for originals (same), exactly, as the reference."""
    sq = _dot(pt, pt)
    return torch.where(same, torch.ones_like(sq), sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt())


def expansion_norms(xu, pts, lam):
    """‖point‖ of every point of an expansion (reference/expansion_points.ExpansionPoints:
    B originals, exactly 1, then n points per segment, √max(‖λx̂_u + (1−λ)x̂_w‖², tiny)) from
    three row dots per segment: the values of the points' own gathered rows bit for bit
    (tests/test_expansion_norms.py), without their two P × D stacks (P = B + n·S: 1 GB in
    fp32 at B = 8192, D = 512, n = 8, classes of 8)."""
    b, n = pts.b, pts.n
    norm = torch.ones(pts.size, dtype=xu.dtype, device=xu.device)
    if n == 0:  # (no branch on the segment count: under torch.compile it is data-dependent)
        return norm
    ru, rw = xu.index_select(0, pts.seg_i), xu.index_select(0, pts.seg_j)
    # per point, λ(λ⟨u,u⟩ + (1−λ)⟨u,w⟩) + (1−λ)(λ⟨w,u⟩ + (1−λ)⟨w,w⟩) (⟨w,u⟩ is ⟨u,w⟩ bit
    # for bit)
    g_uu, g_uw, g_ww = (_dot(p, q).repeat_interleave(n) for p, q in ((ru, ru), (ru, rw),
                                                                      (rw, rw)))
    lm = lam[b:]
    sq = lm * (lm * g_uu + (1 - lm) * g_uw) + (1 - lm) * (lm * g_uw + (1 - lm) * g_ww)
    syn = sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt()
    # a segment between two rows of one index would be an original's (u = w): norm 1
    return torch.cat([norm[:b], torch.where(pts.u[b:] == pts.w[b:], norm[b:], syn)])


def segments_for(labels, expansion):
    """The segments (seg_i, seg_j) of EE's synthetic points, in O(#pairs) memory: none
    without expansion or with n = 0; "adjacent" validates the pairing (raises as the
    reference)."""
    if expansion is None or (expansion.n_points == 0 and expansion.pairs == "all"):
        return labels.new_empty(0), labels.new_empty(0)
    if expansion.pairs == "all":
        return all_segments(labels)
    return expansion_segments(labels, expansion.pairs)


def refs_impl(params, inp, reducer):
    """The batch against references: each anchor's farthest positive and closest negative by
    the loss distance over row blocks (miners/batch_hard.batch_hard_streaming, as the
    BatchHardMiner option of TripletMarginLoss: PML's ties, O(rows·M) memory), then those
    distances with gradient into both sides (their values the full matrix's entries)."""
    x, d = inp.embeddings, inp.distance
    a, p, n, vp, vn = batch_hard_streaming(d, x, inp.ref_emb, inp.labels, inp.ref_labels,
                                           inp.same_set, value_distance=d)
    xu, ru = unit_rows(x), unit_rows(inp.ref_emb)
    cosine = is_cosine(d)
    hp = x.new_zeros(len(x)).index_put((a,), _with_exact_grad(vp, xu, ru, a, p, cosine))
    hn = x.new_zeros(len(x)).index_put((a,), _with_exact_grad(vn, xu, ru, a, n, cosine))
    has = torch.zeros(len(x), dtype=torch.bool, device=x.device).index_fill(0, a, True)
    return reduce_loss_dict(hphn_terms(hp, has, hn, has, d, params.get("margin", 0.2)),
                            reducer, x)


def impl(params, inp, reducer, expansion=None):
    if inp.ref_emb is not inp.embeddings:
        return refs_impl(params, inp, reducer)
    labels = inp.labels.long()
    xu = normalized(inp.distance, inp.embeddings)
    n = 0 if expansion is None else expansion.n_points
    seg_i, seg_j = segments_for(labels, expansion)
    idx = ee_hphn_mine(xu, labels, seg_i, seg_j, n, CHUNK)
    return picks_loss(params, inp, reducer, xu, idx, n)


def _pick_sims_torch(xu, idx, n, l2_pos):
    """hphn_pick_sims (ops/hphn_picks.py) in PyTorch, for GPU tensors: (pos, s_an)."""
    idx = idx.clamp_min(0)  # rows without a pick compute a throw-away value
    p = idx[:, 0]
    # the reference's float64 grid λ = k/(n+1), then the loss dtype (originals: exactly 1)
    lam_a = (idx[:, 3].double() / (n + 1)).to(xu.dtype)
    lam_q = (idx[:, 6].double() / (n + 1)).to(xu.dtype)
    au, aw, qu, qw = idx[:, 1], idx[:, 2], idx[:, 4], idx[:, 5]
    # each endpoint's rows gathered once, by index_select: its backward is one index_add
    ru, rw, rqu, rqw, rp = (xu.index_select(0, i) for i in (au, aw, qu, qw, p))
    # the points themselves, λu + (1 − λ)w (lerp is exact at λ = 1: an original is its row),
    # then three dots
    pa, pq = torch.lerp(rw, ru, lam_a[:, None]), torch.lerp(rqw, rqu, lam_q[:, None])
    s_an = _dot(pa, pq) / (_point_norm(pa, au == aw) * _point_norm(pq, qu == qw))
    # positives are originals: their difference, as cdist, is exact for duplicates
    pos = ((xu - rp) ** 2).sum(1) if l2_pos else (xu * rp).sum(1)
    return pos, s_an


def pick_sims(xu, idx, n, l2_pos, triton: bool = False):
    """hphn_pick_sims by the op of xu's device: the CPU op (hphn_picks_cpu.cpp) on CPU
    tensors, the Triton kernels (triton/pick_sims.py) where Triton runs on them (and always
    for the Triton engine, whose kernels run on CPU tensors under the interpreter), else
    PyTorch from gathered rows. The ops read the picked rows in place: no gathered B×D rows,
    two launches where PyTorch queues about 45."""
    from ..triton import usable_on
    if triton or (xu.device.type != "cpu" and usable_on(xu.device)):
        from ..triton.pick_sims import hphn_pick_sims_triton
        return hphn_pick_sims_triton(xu, idx, n, l2_pos)
    if xu.device.type == "cpu":
        return hphn_pick_sims(xu, idx, n, l2_pos)
    return _pick_sims_torch(xu, idx, n, l2_pos)


def picks_loss(params, inp, reducer, xu, idx, n, triton: bool = False):
    """The loss from the mined picks idx (B × 7 [p, a_u, a_w, a_k, q_u, q_w, q_k], −1: none;
    the CPU op's or the GPU engines'): the chosen distances recomputed with gradient (by the
    Triton kernels for the Triton engine: pick_sims)."""
    x, d = inp.embeddings, inp.distance
    has_pos, has_neg = idx[:, 0] >= 0, idx[:, 4] >= 0
    pos, s_an = pick_sims(xu, idx, n, not d.is_inverted, triton)
    if d.is_inverted:
        hp, hn = pos, s_an
    else:
        hp, hn = safe_sqrt(pos), safe_sqrt(2 - 2 * s_an)
    terms = hphn_terms(hp, has_pos, hn, has_neg, d, params.get("margin", 0.2))
    return reduce_loss_dict(terms, reducer, x)


register("cpu", "HPHNTripletLoss", supports, impl)

