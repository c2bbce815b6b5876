"""Embedding-level Metrix in anchor chunks, O(chunk) memory, on any engine: the mixed term
of a call that no fused Metrix op takes (references `ref_emb`, an `indices_tuple` beside
Metrix, a class too large for the Triton tiles, an engine without a Metrix op, pairs
neg_neg), for the in-batch losses whose soft form the reference has (MultiSimilarity,
Contrastive, Circle, GeneralizedLiftedStructure) and every pairs.

The reference builds every anchor's candidates against every reference pair at once
(B × M × M). Here anchor a of class c (references R, labels y_R) gets

    pos_neg     s(a, mix(p, n)) = (λ S_ap + (1−λ) S_an) / ‖v_pn‖  for p ∈ P(a), n ∈ N(a),
                a K × M row from S = X Rᵀ and its class's K × M rows of R Rᵀ (K: the
                largest class of R among the chunk's); an anchor with no positive, and
                every anchor under anchor_neg, mix(a, n): (λ + (1−λ) S_an) / ‖v_an‖
    pos_pos     the K × K pairs of its positives, from its class's K × K block
    neg_neg     the M × M ordered pairs of distinct references of other classes than a's,
                label 0, s = (λ S_an + (1−λ) S_an′) / ‖v_nn′‖ with ‖v‖ from R Rᵀ, whose
                M × M norms every chunk shares (computed once); a chunk is one anchor
                once 2·M² exceeds CHUNK_ENTRIES: O(M²) memory where the reference holds
                B × M × M, B·M² work either way

(‖v_uw‖² = λ² + (1−λ)² + 2λ(1−λ) s_uw), the membership rules of reference/metrix.py, and
the loss's soft form as parts (sums and counts of its means, metrix_soft_forms.SOFT_PARTS)
adds each chunk's part. Each chunk runs under activation checkpointing: backward rebuilds
its candidates, so memory stays one chunk's, not the B·K·M candidates'. Anchors are taken
in order of their class size, so a chunk pads to nearly its own classes' K.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from .. import _ext
from ..distances import is_cosine, is_normalized_l2
from ..ops.circle_metrix import circle_metrix_lses, finish_circle_mixed
from ..ops.contrastive_metrix import contrastive_metrix_refs_rows
from ..ops.lifted_metrix import finish_lifted_lses, lifted_metrix_lses
from ..ops.ms_metrix import ms_metrix_refs_rows
from ..reference.metrix import mix_norm
from ..reference.metrix_soft_forms import SOFT_PARTS, combine_parts
from ..reducers import zero_loss
from ..ops.unit_rows import unit_rows
from .metrix_pos_pos import class_slots
from ..host_read import host_list

PAIRS = ("pos_neg", "anchor_neg", "pos_pos", "neg_neg")
# candidate entries per chunk (each of the soft form's temporaries is one such tensor)
CHUNK_ENTRIES = 1 << 20


def covers(name: str, inp, metrix) -> bool:
    """Embedding level, a pair kind the chunks build, a loss with a soft form as parts."""
    return (name in SOFT_PARTS and metrix.level == "embedding" and metrix.pairs in PAIRS
            and inp.labels is not None and inp.distance.normalize_embeddings)


def _anchor_slots(labels, classes, slot):
    """Per anchor its class's row of slot (all −1 where R has no member of its class)."""
    if len(classes) == 0:
        return torch.full((len(labels), 1), -1, dtype=torch.long, device=labels.device)
    at = torch.searchsorted(classes, labels.contiguous()).clamp(max=len(classes) - 1)
    found = classes[at] == labels
    return torch.where(found[:, None], slot[at], torch.full_like(slot[at], -1))


def _chunk_parts(name, hyper, distance, pairs, lam, anchors, pslots, self_idx, ref_labels,
                 labels, xh, rh, norm_rr=None):
    """The soft form's parts over the anchors `anchors` (their positive slots `pslots`,
    chunk × K, and their own index in R or −1); neg_neg: norm_rr, ‖v_nn′‖ of every ordered
    pair of references (M × M, shared by the chunks)."""
    xa, la = xh[anchors], labels[anchors]
    # every candidate has the same soft label (λ, 1 for pos_pos, 0 for neg_neg): one
    # broadcast entry
    y = xa.new_full((1, 1), {"pos_pos": 1.0, "neg_neg": 0.0}.get(pairs, lam))
    if pairs == "neg_neg":  # every ordered pair of distinct negatives: chunk × M × M
        S = xa @ rh.t()
        m = rh.shape[0]
        neg = la[:, None] != ref_labels[None, :]
        sim = (lam * S[:, :, None] + (1 - lam) * S[:, None, :]) / norm_rr[None]
        member = neg[:, :, None] & neg[:, None, :]
        member.diagonal(dim1=1, dim2=2).fill_(False)  # n ≠ n′
        parts = SOFT_PARTS[name](sim.reshape(-1, m * m), y, member.reshape(-1, m * m),
                                 distance, **hyper)
        return torch.stack([t for t, _ in parts]), torch.stack([n for _, n in parts])
    valid = (pslots >= 0) & (pslots != self_idx[:, None])  # P(a): its class in R, not a
    ps = pslots.clamp(min=0)
    rp = rh[ps]  # chunk × K × D: the anchors' positives
    k = ps.shape[1]
    tables = []  # (s, member) of disjoint sets of the chunk's anchors
    if pairs == "pos_pos":  # only the class blocks: no chunk × M product
        sp = torch.einsum("cd,ckd->ck", xa, rp)  # S_ap
        gpp = rp @ rp.transpose(1, 2)  # chunk × K × K
        sim = (lam * sp[:, :, None] + (1 - lam) * sp[:, None, :]) / mix_norm(lam, gpp)
        member = valid[:, :, None] & valid[:, None, :] & (ps[:, :, None] != ps[:, None, :])
        tables.append((sim.reshape(-1, k * k), member.reshape(-1, k * k)))
    else:
        S = xa @ rh.t()  # chunk × M
        m = rh.shape[0]
        neg = la[:, None] != ref_labels[None, :]
        # each anchor's candidates are either mixes of its positives or, with none (or
        # under anchor_neg), mixes of itself: two tables over two sets of anchors
        own = torch.ones_like(la, dtype=torch.bool) if pairs == "anchor_neg" else ~valid.any(1)
        rest = (~own).nonzero().squeeze(1)
        if len(rest):
            sr = S.index_select(0, rest)
            sp = sr.gather(1, ps.index_select(0, rest))  # S_ap
            gpn = rp.index_select(0, rest) @ rh.t()  # each positive's row of R Rᵀ
            sim = (lam * sp[:, :, None] + (1 - lam) * sr[:, None, :]) / mix_norm(lam, gpn)
            member = valid.index_select(0, rest)[:, :, None] & neg.index_select(0, rest)[:, None, :]
            tables.append((sim.reshape(-1, k * m), member.reshape(-1, k * m)))
        mine = own.nonzero().squeeze(1)
        if len(mine):  # mix(a, n): s(a, a) = 1 for a unit anchor, ‖v_an‖ from S_an itself
            so = S.index_select(0, mine)
            tables.append(((lam + (1 - lam) * so) / mix_norm(lam, so), neg.index_select(0, mine)))
    parts = None
    for s, member in tables:
        got = SOFT_PARTS[name](s, y, member, distance, **hyper)
        parts = got if parts is None else [(t + t2, n + n2) for (t, n), (t2, n2) in zip(parts, got)]
    return torch.stack([t for t, _ in parts]), torch.stack([n for _, n in parts])


def _chunks(width, entries):
    """Consecutive runs of the anchors in order of class size whose candidate tables
    (rows × entries(K of the run's largest class)) stay within CHUNK_ENTRIES; an anchor
    whose own row is larger is a chunk of its own (still one row where the reference holds
    all of them)."""
    order = torch.argsort(width, stable=True)
    sizes = host_list(width[order])
    start = 0
    while start < len(sizes):
        end = start + 1
        while end < len(sizes) and (end + 1 - start) * entries(sizes[end]) <= CHUNK_ENTRIES:
            end += 1
        yield order[start:end], max(sizes[end - 1], 1)
        start = end


def with_negatives(labels, ref_labels):
    """How many anchors have a negative among the references: those whose V(a) is non-empty
    (their candidates mix their positives, or themselves, with those negatives)."""
    srt = torch.sort(ref_labels).values
    same = torch.searchsorted(srt, labels, right=True) - torch.searchsorted(srt, labels)
    return (same < len(ref_labels)).sum()


def ops_cover(name: str, distance) -> bool:
    """Whether the engines' refs ops take `name`'s mixed term under `distance`: MS and Circle
    with their cosine, Contrastive and GeneralizedLifted with the cosine or the normalised
    L2."""
    cosine = is_cosine(distance)
    if name in ("MultiSimilarityLoss", "CircleLoss"):
        return cosine
    return name in ("ContrastiveLoss", "GeneralizedLiftedStructureLoss") and (
        cosine or is_normalized_l2(distance))


def _finish(name, out, lam, xh, labels, ref_labels):
    """L̃ from a refs op's per-anchor outputs, either engine's, in any anchor order: MS's
    ℓ̃(a) (the mean over anchors with a negative among the references), Circle's and
    GeneralizedLifted's candidate (lse⁺, lse⁻), Contrastive's (sums, counts)."""
    if name == "MultiSimilarityLoss":
        return combine_parts([(out.sum(), with_negatives(labels, ref_labels))], xh)
    if name == "CircleLoss":
        return finish_circle_mixed(torch.isfinite(out[0]), out[0] + out[1], lam, xh)
    if name == "ContrastiveLoss":
        from .contrastive import mixed_contrastive  # lazy: contrastive → multi_similarity → here
        return mixed_contrastive(out, xh)
    return finish_lifted_lses(out[0], out[1], lam, xh)


def _fused_term(name, params, inp, pairs, lam, xh, rh, self_idx, engine=None):
    """L̃ from the CPU engine's ops of anchors against references (csrc/cpu/metrix_refs_walk.h:
    per class its anchors' rows of X Rᵀ and its positives' rows of R Rᵀ, the candidates in
    the in-batch ops' kernels), the mixed term alone (the clean loss is another path's here:
    an indices_tuple, ...), or None where they have none: pos_neg or anchor_neg, CPU tensors,
    the losses and distances of ops_cover. CUDA tensors, beside the CUDA engine's clean loss
    (engine "cuda"): its refs ops (fused/cuda_metrix_refs.py), for the same losses and
    distances; the other engines keep the chunks until the ops are measured on a GPU."""
    d = inp.distance
    on_cuda = xh.device.type == "cuda" and engine == "cuda"
    if not (_ext.HAS_EXT and pairs in ("pos_neg", "anchor_neg") and ops_cover(name, d)
            and (xh.device.type == "cpu" or on_cuda)):
        return None
    if name == "CircleLoss" and not 0.0 < lam < 1.0:  # a side without label mass: ℓ̃ = 0
        return zero_loss(xh)
    labels, ref_labels = inp.labels, inp.ref_labels
    if xh.dtype in (torch.float16, torch.bfloat16):  # computed in fp32, as the clean ops
        xh, rh = xh.float(), rh.float()
    if on_cuda:
        from . import cuda_metrix_refs  # lazy: it imports this module
        if not cuda_metrix_refs.HAS_OPS:
            return None
        out = cuda_metrix_refs.refs_rows(name, params, inp, pairs, lam, xh, rh, self_idx)
        return _finish(name, out, lam, xh, labels, ref_labels)
    refs = (rh, ref_labels, self_idx)
    if name == "MultiSimilarityLoss":
        _, out = ms_metrix_refs_rows(xh, rh, labels, ref_labels, self_idx, params["alpha"],
                                     params["beta"], params["base"], lam, pairs, clean=False)
    elif name == "CircleLoss":
        out = circle_metrix_lses(xh, labels, params["m"], params["gamma"], lam, pairs,
                                 refs=refs)
    elif name == "ContrastiveLoss":
        _, out = contrastive_metrix_refs_rows(xh, rh, labels, ref_labels, self_idx,
                                              is_cosine(d), params["pos_margin"],
                                              params["neg_margin"], lam, pairs)
    else:
        out = lifted_metrix_lses(xh, labels, is_cosine(d), params["pos_margin"],
                                 params["neg_margin"], lam, pairs, refs=refs)
    return _finish(name, out, lam, xh, labels, ref_labels)


def mixed_term(name: str, params: dict, inp, metrix, lam: float, engine: str | None = None):
    """L̃ (unweighted) of a call covers() accepts, beside the clean loss of `engine` (the
    driver's chosen backend, which picks the refs ops of CUDA tensors)."""
    x, labels, ref_labels = inp.embeddings, inp.labels, inp.ref_labels
    b, m, d, pairs = x.shape[0], inp.ref_emb.shape[0], x.shape[1], metrix.pairs
    if b == 0 or m == 0:
        return torch.sum(x * 0)
    xh = unit_rows(x)
    rh = xh if inp.ref_emb is x else unit_rows(inp.ref_emb.to(x.dtype))
    self_idx = (torch.arange(b, device=x.device) if inp.same_set
                else torch.full((b,), -1, dtype=torch.long, device=x.device))
    fused = _fused_term(name, params, inp, pairs, lam, xh, rh, self_idx, engine)
    if fused is not None:
        return fused
    if pairs == "neg_neg":  # no positive enters: one column of no slot
        pslots = torch.full((b, 1), -1, dtype=torch.long, device=x.device)
    else:
        _, classes, _, _, slot = class_slots(ref_labels)  # slot[c, k]: R's class c's k-th row
        pslots = _anchor_slots(labels, classes, slot)  # B × K_max
    width = (pslots >= 0).sum(1)  # each anchor's class size in R

    def entries(k):  # per anchor: its candidates, and its positives' rows (K × D)
        if pairs == "neg_neg":
            return m * m
        return {"pos_neg": (k + 1) * m, "anchor_neg": m, "pos_pos": k * k}[pairs] + k * d

    # neg_neg: the M × M mixes' norms once (every chunk's candidates use all of them)
    norm_rr = mix_norm(lam, rh @ rh.t()) if pairs == "neg_neg" else None
    hyper = {k: v for k, v in params.items() if k != "proxies"}
    totals = counts = None
    for anchors, k in _chunks(width, entries):
        def run(xh_, rh_, norm_, anchors=anchors, k=k):
            return _chunk_parts(name, hyper, inp.distance, pairs, lam, anchors,
                                pslots[anchors, :k], self_idx[anchors], ref_labels, labels,
                                xh_, rh_, norm_)
        t, n = checkpoint(run, xh, rh, norm_rr, use_reentrant=False)
        totals, counts = (t, n) if totals is None else (totals + t, counts + n)
    return combine_parts(list(zip(totals, counts)), xh)
