"""Embedding-level Metrix with pairs="pos_pos" on the fused engines, for the in-batch losses
whose soft form the reference has (MultiSimilarity, Contrastive, Circle,
GeneralizedLiftedStructure): every candidate of anchor a is mix(p, p′, λ) of two other
members of a's class, label 1, so its cosine to a needs only that class's Gram block,

    s(a, mix(p, p′)) = (λ G_ap + (1−λ) G_ap′) / ‖v_pp′‖,   ‖v_pp′‖² = λ² + (1−λ)² + 2λ(1−λ) G_pp′.

Each anchor's (K−1)(K−2) candidates come out as one padded row of a B × K² table (K: the
largest class), built from per-class K × K blocks in PyTorch on the embeddings' device, and
the loss's own soft form (reference/metrix_soft_forms) reduces them exactly as the reference
reduces its rows. Memory O(B·K²) (K the largest class), where the reference's candidate
tensor is B × B × B; no custom op, so every engine (CPU, CUDA, Triton) serves it beside its
clean loss (driver.py)."""
from __future__ import annotations

import torch

from ..reference.metrix import mix_norm
from ..reference.metrix_soft_forms import SOFT_FORMS
from ..ops.unit_rows import unit_rows

LOSSES = ("MultiSimilarityLoss", "ContrastiveLoss", "CircleLoss",
          "GeneralizedLiftedStructureLoss")
# entries of the B × K² candidate table beyond which the reference runs instead (a class of
# thousands; the reference's table is B³ there)
MAX_ENTRIES = 1 << 26


def covers(name: str, inp, metrix) -> bool:
    """Embedding level, pos_pos, the batch against itself, a loss with a soft form."""
    return (name in LOSSES and metrix.level == "embedding" and metrix.pairs == "pos_pos"
            and inp.labels is not None and inp.same_set and inp.ref_emb is inp.embeddings
            and inp.distance.normalize_embeddings)


def class_slots(labels):
    """(order, classes, inv, rank, slot) of the labels: order sorts them (stable), classes are
    the distinct labels, inv / rank each sorted row's class and place in it, and slot[c, k]
    the k-th member (index into labels) of class c, −1 past its size."""
    order = torch.argsort(labels, stable=True)
    classes, inv, counts = torch.unique_consecutive(labels[order], return_inverse=True,
                                                    return_counts=True)
    k = int(counts.max()) if len(counts) else 0
    rank = torch.arange(len(order), device=labels.device) - (torch.cumsum(counts, 0) - counts)[inv]
    slot = torch.full((len(classes), max(k, 1)), -1, dtype=torch.long, device=labels.device)
    slot[inv, rank] = order
    return order, classes, inv, rank, slot


def candidate_rows(xu, labels, lam: float):
    """(s, member), B × K²: anchor i's row holds s(i, mix(p, p′)) for the ordered pairs of
    its class's members (p, p′ at their ranks in the class), member where p ≠ p′ and both
    differ from i. Built per anchor from its class's K × K block (B × K × K, never C × K³).
    None when the rows would exceed MAX_ENTRIES."""
    b, dev = len(labels), labels.device
    order, _, inv, rank, slot = class_slots(labels)  # slot: C × K, members in index order
    k = slot.shape[1]
    if b * k * k > MAX_ENTRIES:
        return None
    valid = slot >= 0
    xc = xu[slot.clamp(min=0)] * valid[..., None].to(xu.dtype)  # padding rows: 0
    g = xc @ xc.transpose(1, 2)  # C × K × K: each class's Gram block
    norm = mix_norm(lam, g)
    # per anchor (in sorted order): its row of the block and its class's norms
    ga, na = g[inv, rank], norm[inv]  # B × K, B × K × K
    s = (lam * ga[:, :, None] + (1 - lam) * ga[:, None, :]) / na
    own = torch.arange(k, device=dev)[None, :] == rank[:, None]  # B × K: the anchor itself
    ok = valid[inv] & ~own
    eye = torch.eye(k, dtype=torch.bool, device=dev)
    member = ok[:, :, None] & ok[:, None, :] & ~eye
    back = torch.empty_like(order)
    back[order] = torch.arange(b, device=dev)
    return s.reshape(b, k * k).index_select(0, back), member.reshape(b, k * k).index_select(0, back)


def mixed_term(name: str, params: dict, inp, lam: float):
    """L̃ (unweighted) of a pos_pos call covers() accepts; None where the reference must run."""
    x = inp.embeddings
    found = candidate_rows(unit_rows(x), inp.labels, lam)
    if found is None:
        return None
    s, member = found
    if not bool(member.any()):
        return torch.sum(x * 0)  # no anchor has two other class members: as the reference
    hyper = {k: v for k, v in params.items() if k != "proxies"}
    return SOFT_FORMS[name](s, torch.ones_like(s), member, inp.distance, **hyper)
