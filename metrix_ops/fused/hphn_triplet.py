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


def _point_inner(pu, pw, plam, qu, qw, qlam):
    """⟨p, q⟩ of unnormalised points from their endpoints' rows (B × D each, gathered once),
    in the reference's association (rows of H, then λ)."""
    return (plam * (qlam * _dot(pu, qu) + (1 - qlam) * _dot(pu, qw))
            + (1 - plam) * (qlam * _dot(pw, qu) + (1 - qlam) * _dot(pw, qw)))


def _norm_of_rows(u, w, same, lam):
    """‖point‖ from its endpoints' rows; 1 for originals (same), exactly, as the reference."""
    sq = _point_inner(u, w, lam, u, w, lam)
    return torch.where(same, torch.ones_like(sq), sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt())


def _point_norm(pt, same):
    """‖pt‖ of points given by their rows; 1 for originals (same), exactly, as the reference."""
    sq = _dot(pt, pt)
    return torch.where(same, torch.ones_like(sq), sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt())


def point_norm(xu, u, w, lam):
    """‖point‖ of the points (u, w, λ) of xu's rows."""
    return _norm_of_rows(xu.index_select(0, u), xu.index_select(0, w), u == w, lam)


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


def picks_loss(params, inp, reducer, xu, idx, n):
    """The loss from the mined picks idx (B × 7 [p, a_u, a_w, a_k, q_u, q_w, q_k], −1: none;
    the CPU op's or the Triton engine's): the chosen distances recomputed with gradient."""
    x, d = inp.embeddings, inp.distance
    has_pos, has_neg = idx[:, 0] >= 0, idx[:, 4] >= 0
    if xu.device.type == "cpu":
        # the op reads the picked rows in place (hphn_picks_cpu.cpp): no gathered B×D rows
        pos, s_an = hphn_pick_sims(xu, idx, n, not d.is_inverted)
    else:
        pos, s_an = _pick_sims_torch(xu, idx, n, not d.is_inverted)
    if d.is_inverted:
        hp, hn = pos, s_an
    else:
        hp, hn = safe_sqrt(pos), safe_sqrt(2 - 2 * s_an)
    terms = hphn_terms(hp, has_pos, hn, has_neg, d, params.get("margin", 0.2))
    return reduce_loss_dict(terms, reducer, x)


register("cpu", "HPHNTripletLoss", supports, impl)

