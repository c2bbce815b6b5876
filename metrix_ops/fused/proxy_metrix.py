"""ProxyAnchorLoss and ProxyNCALoss with embedding-level Metrix through the fused ops: the
clean loss from its own fused op, the mixed term L̃ from proxy_anchor_metrix_fwd /
proxy_nca_metrix_fwd, which stream over the ordered batch pairs (no K×C matrix, K ≈ B²).
L̃ is the reference's (reference/metrix.py, metrix_soft_forms.proxy_*_soft): ProxyAnchor's
per-proxy divisors (proxies with positive mass, all proxies), ProxyNCA's mean over the
candidates; an empty candidate set gives a zero term."""
from __future__ import annotations

import torch

from ..ops.proxy_metrix import (candidate_count, proxy_anchor_metrix_terms,
                                proxy_nca_metrix_rows)
from ..reference.proxy_nca import logit_scale
from .pair_counts import class_counts
from ..ops.unit_rows import unit_rows
from . import proxy_anchor, proxy_nca, register_metrix


def _embedding_level(metrix) -> bool:
    return metrix.level == "embedding"


def anchor_supports(params, inp, expansion, metrix) -> bool:
    """Where the clean fused op runs (cosine, the batch, no indices_tuple), any `pairs`."""
    return proxy_anchor.supports(params, inp, expansion) and _embedding_level(metrix)


def nca_supports(params, inp, expansion, metrix) -> bool:
    """Where the clean fused op runs (cosine or PML's squared L2, normalised proxies)."""
    return proxy_nca.supports(params, inp, expansion) and _embedding_level(metrix)


def _units(params, inp):
    x = inp.embeddings
    # as the reference: a differentiable cast, so the parameter keeps its dtype
    return unit_rows(x), unit_rows(params["proxies"].to(x.dtype))


def anchor_mixed(params, inp, pairs: str, lam: float, chunk=None, terms_fn=None):
    """L̃ of ProxyAnchorLoss: Σ_c pos_c / #proxies with positive mass + Σ_c neg_c / C;
    terms_fn: an engine's per-proxy terms (default the CPU op's)."""
    xu, p = _units(params, inp)
    labels, same = inp.labels, pairs == "pos_pos"
    terms_fn = proxy_anchor_metrix_terms if terms_fn is None else terms_fn
    pos, neg = terms_fn(xu, p, labels, params["alpha"], params["margin"], lam, same, chunk)
    # a proxy has positive mass iff some candidate's pair holds its class: with
    # different-label pairs, a present class beside another one; with same-label pairs, a
    # class of two examples or more (λ + (1−λ) > 0 always)
    counts = class_counts(labels, p.shape[0])
    with_mass = (counts >= 2) if same else (counts > 0) & (counts < len(labels))
    n = with_mass.sum()  # a tensor and a select: no host sync, no graph break
    pos_loss = torch.where(n > 0, pos.sum() / n.clamp_min(1), pos.sum() * 0)
    return pos_loss + neg.sum() / p.shape[0]


def nca_mixed(params, inp, pairs: str, lam: float, chunk=None, rows_fn=None):
    """L̃ of ProxyNCALoss: the soft-target cross-entropy's mean over the candidates; rows_fn:
    an engine's per-row sums (default the CPU op's proxy_nca_metrix_rows)."""
    xu, p = _units(params, inp)
    labels, same = inp.labels, pairs == "pos_pos"
    scale = logit_scale(params["softmax_scale"], params.get("temperature"),
                        params.get("normalize_proxies"))
    rows_fn = proxy_nca_metrix_rows if rows_fn is None else rows_fn
    rows = rows_fn(xu, p, labels, scale, proxy_nca._kind(inp.distance), lam, same, chunk)
    k = candidate_count(labels, p.shape[0], same)
    return torch.where(k > 0, rows.sum() / k.clamp_min(1), rows.sum() * 0)


def anchor_impl(params, inp, reducer, metrix, lam: float):
    return (proxy_anchor.impl(params, inp, reducer)
            + metrix.weight * anchor_mixed(params, inp, metrix.pairs, lam))


def nca_impl(params, inp, reducer, metrix, lam: float):
    return (proxy_nca.impl(params, inp, reducer)
            + metrix.weight * nca_mixed(params, inp, metrix.pairs, lam))


register_metrix("cpu", "ProxyAnchorLoss", anchor_supports, anchor_impl)
register_metrix("cpu", "ProxyNCALoss", nca_supports, nca_impl)
