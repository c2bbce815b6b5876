"""Metrix (ICLR 2022) mixed loss L̃, the reference: exact, from closed-form Gram entries at
the embedding level (no mixed point is built), from the network's mixed embeddings at the
feature / input level. The driver adds `weight · L̃` to the clean loss.

Candidate sets V(a) of an in-batch anchor a. P(a)/N(a) are a's positives/negatives in the
reference set (the batch unless ref_emb is given; a itself is never in P(a) when the
reference set is the batch); pairs are ordered (mix(u, w, λ) ≠ mix(w, u, λ)) and distinct
by index (duplicate rows are different examples):
  pos_neg     mix(p, n, λ) for every p ∈ P(a), n ∈ N(a), label λ; an anchor with no
              positive uses mix(a, n, λ), n ∈ N(a), label λ, instead
  anchor_neg  mix(a, n, λ), n ∈ N(a), label λ (every anchor)
  pos_pos     mix(p, p′, λ), p ≠ p′ ∈ P(a), label 1
  neg_neg     mix(n, n′, λ), n ≠ n′ ∈ N(a), label 0 (n, n′ may be of different classes)
An anchor with an empty V(a) is left out (no term, not counted in a mean); an empty V
everywhere gives a zero loss that still has a graph.

Proxy losses (ProxyAnchor: proxies are the anchors; ProxyNCA: the mixed points are the
queries) take one candidate set for the whole batch, mix(i, j, λ) over ordered batch pairs
i ≠ j of different labels (pos_neg, anchor_neg, neg_neg: a pair of different classes is a
positive–negative pair for the proxies of its two classes and a negative–negative pair for
every other proxy; with proxies as anchors there is no in-batch anchor to mix, so
anchor_neg has nothing else to mean) or of the same label (pos_pos), with class mass
λ·onehot(y_i) + (1−λ)·onehot(y_j): ProxyAnchor's proxy c sees each with y = its mass on c.

Feature / input level: the candidates are the K given mixed embeddings v_k (of
mix(u = src_a[k], w = src_b[k], λ_k)), with labels y(a, k) = λ_k[y_u = y_a] + (1−λ_k)[y_w = y_a];
v_k is a candidate of every clean anchor a whose V(a) above would hold mix(u, w), by index
and labels (pos_neg: u ∈ P(a), w ∈ N(a), or u = a, w ∈ N(a) for an anchor without
positive; anchor_neg: u = a, w ∈ N(a); pos_pos: u ≠ w ∈ P(a); neg_neg: u ≠ w ∈ N(a)),
P/N taken in the batch (ref_emb is not used: the mixes are of batch rows). So a mix serves
every anchor it fits, not only the one it was chosen for, and fed every pair it equals
the embedding-level closed form. Proxy losses use all K candidates with their class mass.

Mixing is of L2-normalised points: s(a, v̂) = (λ s_au + (1−λ) s_aw)/‖v‖ with
‖v‖² = λ² + (1−λ)² + 2λ(1−λ) s_uw (DESIGN §1); Lp-distance losses (p = 2) use
d = sqrt(max(2 − 2s, 0)). The soft forms of the losses are in metrix_soft_forms.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..spec import LossInputs
from .metrix_soft_forms import PROXY_LOSSES, SOFT_FORMS
from .pairs import match_masks

EPS = 1e-12  # as F.normalize: a mix of antipodal points has no direction


def _check_supported(name, inp):
    if name not in SOFT_FORMS:
        raise NotImplementedError(f"Metrix is not implemented for {name}; it supports "
                                  f"{', '.join(sorted(SOFT_FORMS))}")
    if not inp.distance.normalize_embeddings:
        raise NotImplementedError("Metrix mixes L2-normalised embeddings: use a distance with "
                                  "normalize_embeddings=True")


def mix_norm(lam, s_uw):
    return (lam**2 + (1 - lam) ** 2 + 2 * lam * (1 - lam) * s_uw).clamp_min(0).sqrt().clamp_min(EPS)


def _in_batch_candidates(S, G, pos, neg, lam, pairs):
    """(s, y, member), each B × K, of every anchor against its closed-form candidates.
    S: anchors×refs cosines, G: refs×refs cosines, pos/neg: anchors×refs masks."""
    b, m = S.shape
    parts = []
    if pairs in ("pos_neg", "pos_pos", "neg_neg"):
        # candidate (u, w) over refs × refs: s = (λ S_au + (1−λ) S_aw) / ‖v(u, w)‖
        sim = (lam * S[:, :, None] + (1 - lam) * S[:, None, :]) / mix_norm(lam, G)[None]
        not_same = ~torch.eye(m, dtype=torch.bool, device=S.device)[None]
        if pairs == "pos_neg":
            member, y = pos[:, :, None] & neg[:, None, :], lam
        elif pairs == "pos_pos":
            member, y = pos[:, :, None] & pos[:, None, :] & not_same, 1.0
        else:
            member, y = neg[:, :, None] & neg[:, None, :] & not_same, 0.0
        parts.append((sim.reshape(b, m * m), torch.full_like(sim, y).reshape(b, m * m),
                      member.reshape(b, m * m)))
    if pairs in ("pos_neg", "anchor_neg"):
        # candidate mix(a, n): s(a, a) = 1 for a unit anchor, s_uw = S_an
        sim = (lam + (1 - lam) * S) / mix_norm(lam, S)
        member = neg if pairs == "anchor_neg" else neg & ~pos.any(1, keepdim=True)
        parts.append((sim, torch.full_like(sim, lam), member))
    return [torch.cat(t, dim=1) for t in zip(*parts)]


def _proxy_candidates(x, labels, proxies, lam, pairs):
    """Closed-form candidate–proxy cosines (K × C) and class masses (K × C)."""
    xh, ph = F.normalize(x, dim=1), F.normalize(proxies.to(x.dtype), dim=1)
    sp, G = xh @ ph.t(), xh @ xh.t()
    same = labels[:, None] == labels[None, :]
    keep = same if pairs == "pos_pos" else ~same
    keep = keep & ~torch.eye(len(x), dtype=torch.bool, device=x.device)
    i, j = torch.where(keep)
    s = (lam * sp[i] + (1 - lam) * sp[j]) / mix_norm(lam, G[i, j])[:, None]
    oh = F.one_hot(labels.long(), proxies.shape[0]).to(x.dtype)
    y = lam * oh[i] + (1 - lam) * oh[j]
    return s, y


def _feature_membership(labels, mixed, pairs):
    """B × K: which clean anchors each given mixed example is a candidate of (the
    embedding-level V(a) rules of the module docstring, by source index and label)."""
    ya = labels[:, None]
    u, w = mixed.src_a[None, :], mixed.src_b[None, :]
    lu, lw = labels[mixed.src_a][None, :], labels[mixed.src_b][None, :]
    a = torch.arange(len(labels), device=labels.device)[:, None]
    has_pos = ((labels[:, None] == labels[None, :]).sum(1) > 1)[:, None]
    anchor_neg = (u == a) & (lw != ya)
    if pairs == "pos_neg":
        return ((lu == ya) & (u != a) & (lw != ya)) | (~has_pos & anchor_neg)
    if pairs == "anchor_neg":
        return anchor_neg
    if pairs == "pos_pos":
        return (lu == ya) & (lw == ya) & (u != a) & (w != a) & (u != w)
    return (lu != ya) & (lw != ya) & (u != w)


def _check_mixed(mixed_embeddings, mixed, inp):
    from ..mixup.mixed_batch import MixedBatch
    from ..validation import check_embeddings
    if not isinstance(mixed, MixedBatch):
        raise TypeError(f"mixed must be a metrix_ops.mixup.MixedBatch, got {type(mixed).__name__}")
    check_embeddings(mixed_embeddings, "mixed_embeddings", allow_empty=True)
    if mixed_embeddings.shape[0] != len(mixed):
        raise ValueError(f"mixed_embeddings has {mixed_embeddings.shape[0]} rows but mixed "
                         f"describes {len(mixed)} mixed examples")
    if mixed_embeddings.shape[1] != inp.embeddings.shape[1]:
        raise ValueError(f"mixed_embeddings has dim {mixed_embeddings.shape[1]} but embeddings "
                         f"has {inp.embeddings.shape[1]}")
    if mixed_embeddings.device != inp.embeddings.device:
        raise ValueError(f"mixed_embeddings is on {mixed_embeddings.device} but embeddings is on "
                         f"{inp.embeddings.device}")
    if mixed.src_a.device != inp.embeddings.device:
        raise ValueError(f"mixed's indices are on {mixed.src_a.device} but embeddings is on "
                         f"{inp.embeddings.device}")
    if len(mixed) and int(max(mixed.src_a.max(), mixed.src_b.max())) >= len(inp.embeddings):
        raise ValueError("mixed indexes rows outside the batch of embeddings")
    labels = inp.labels
    if not (torch.equal(mixed.labels_a.to(labels.device), labels[mixed.src_a])
            and torch.equal(mixed.labels_b.to(labels.device), labels[mixed.src_b])):
        raise ValueError("mixed.labels_a/labels_b are not labels[src_a]/labels[src_b] of this "
                         "batch: the MixedBatch was built for other labels")


def _mixed_lam(mixed, like):
    """The MixedBatch's λ as a float or a 1 × K row (per-row λ) in the dtype of `like`."""
    lam = mixed.lam
    return lam if not torch.is_tensor(lam) else lam.to(device=like.device, dtype=like.dtype)[None, :]


def metrix_loss(name: str, params: dict, inp: LossInputs, cfg, lam: float,
                mixed_embeddings=None, mixed=None) -> torch.Tensor:
    """L̃ of loss `name` (unweighted). Embedding level (mixed is None): λ = `lam`, candidates
    in closed form. Feature / input level: λ is the MixedBatch's (`lam` is not used) and
    `mixed.pairs` must be `cfg.pairs`."""
    _check_supported(name, inp)
    if mixed is not None:
        _check_mixed(mixed_embeddings, mixed, inp)
        if mixed.pairs != cfg.pairs:
            raise ValueError(f"the MixedBatch was built with pairs={mixed.pairs!r} but the loss "
                             f"has Metrix(pairs={cfg.pairs!r}); they must agree")
    soft = SOFT_FORMS[name]
    hyper = {k: v for k, v in params.items() if k != "proxies"}
    x, labels = inp.embeddings, inp.labels
    if name in PROXY_LOSSES:
        proxies = params["proxies"]
        if mixed is None:
            s, y = _proxy_candidates(x, labels, proxies, lam, cfg.pairs)
        else:
            v = F.normalize(mixed_embeddings.to(x.dtype), dim=1)
            s = v @ F.normalize(proxies.to(x.dtype), dim=1).t()
            y = mixed.soft_labels(proxies.shape[0], x.dtype)
        member = torch.ones_like(s, dtype=torch.bool)
        if name == "ProxyAnchorLoss":  # proxies are the anchors: rows are proxies
            s, y, member = s.t(), y.t(), member.t()
        if s.numel() == 0:
            return torch.sum(x * 0)
        return soft(s, y, member, inp.distance, **hyper)

    xh = F.normalize(x, dim=1)
    if mixed is None:
        r = F.normalize(inp.ref_emb, dim=1)
        pos, neg = match_masks(labels, inp.ref_labels, inp.same_set)
        s, y, member = _in_batch_candidates(xh @ r.t(), r @ r.t(), pos, neg, lam, cfg.pairs)
    else:
        v = F.normalize(mixed_embeddings.to(x.dtype), dim=1)
        s = xh @ v.t()
        member = _feature_membership(labels, mixed, mixed.pairs)
        same_u = (labels[:, None] == mixed.labels_a[None, :]).to(x.dtype)
        same_w = (labels[:, None] == mixed.labels_b[None, :]).to(x.dtype)
        lam_k = _mixed_lam(mixed, x)
        y = lam_k * same_u + (1 - lam_k) * same_w
    if not member.any():
        return torch.sum(x * 0)
    return soft(s, y, member, inp.distance, **hyper)
