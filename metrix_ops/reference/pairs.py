"""PML's pair/triplet index conventions, written once for every reference loss.

Self pairs are excluded exactly when PML excludes them: when the reference labels *are*
the batch labels (the same tensor object), which is the case when no ref_emb is given.
"""
from __future__ import annotations

import torch


def match_masks(labels, ref_labels, same_set: bool):
    """(pos, neg) boolean B×M masks; the diagonal is not positive when same_set."""
    pos = labels[:, None] == ref_labels[None, :]
    neg = ~pos
    if same_set:
        pos = pos.clone()
        pos.fill_diagonal_(False)
    return pos, neg


def all_pairs(labels, ref_labels, same_set: bool):
    pos, neg = match_masks(labels, ref_labels, same_set)
    a1, p = torch.where(pos)
    a2, n = torch.where(neg)
    return a1, p, a2, n


def to_pairs(indices_tuple, labels, ref_labels, same_set: bool):
    """PML's convert_to_pairs: all pairs if None, as given if 4-tuple, (a,p,a,n) from triplets."""
    if indices_tuple is None:
        return all_pairs(labels, ref_labels, same_set)
    if len(indices_tuple) == 4:
        return tuple(indices_tuple)
    a, p, n = indices_tuple
    return a, p, a, n


def all_triplets(labels, ref_labels, same_set: bool):
    pos, neg = match_masks(labels, ref_labels, same_set)
    return torch.where(pos[:, :, None] & neg[:, None, :])


def to_triplets(indices_tuple, labels, ref_labels, same_set: bool):
    """PML's convert_to_triplets: all triplets if None; from pairs, every (a,p,n) sharing a."""
    if indices_tuple is None:
        return all_triplets(labels, ref_labels, same_set)
    if len(indices_tuple) == 3:
        return tuple(indices_tuple)
    a1, p, a2, n = indices_tuple
    keep = a1[:, None] == a2[None, :]
    i, j = torch.where(keep)
    return a1[i], p[i], n[j]


def pair_mask(rows, cols, shape, device) -> torch.Tensor:
    m = torch.zeros(shape, dtype=torch.bool, device=device)
    m[rows, cols] = True
    return m


def pair_terms_present(pairs) -> bool:
    """PML's GenericPairLoss gives zero losses when every index list has at most one entry."""
    return not all(len(x) <= 1 for x in pairs)


def mat_and_masks(inp):
    """(distance matrix, pos mask, neg mask) over the pairs of the call, or None when PML
    would return zero losses. Masks are boolean B×M."""
    a1, p, a2, n = to_pairs(inp.indices_tuple, inp.labels, inp.ref_labels, inp.same_set)
    if not pair_terms_present((a1, p, a2, n)):
        return None
    mat = inp.distance(inp.embeddings, inp.ref_emb)
    shape, dev = mat.shape, mat.device
    return mat, pair_mask(a1, p, shape, dev), pair_mask(a2, n, shape, dev)
