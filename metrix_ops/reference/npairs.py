"""NPairsLoss (Sohn 2016) with PML's semantics.

PML keeps one positive pair per anchor label: of the positive pairs, in their order (all
pairs row-major, or the indices_tuple's (a, p) / (a1, p) order), the first pair whose
anchor has that label (np.unique(labels[a], return_index=True)), the kept pairs sorted by
label. Each kept anchor then takes a cross-entropy over the similarities to all kept
positives, its own being the target; mean reduced.

PML quirks reproduced: the default DotProductSimilarity still L2-normalises (PML's
BaseDistance default), so the default loss works on cosine similarities, not the paper's
raw dot products; with a distance the logits are −d; ref_emb is not supported.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..distances import DotProductSimilarity
from ..reducers import MeanReducer
from ..spec import LossInputs, register_loss
from .pairs import to_pairs


def unique_label_pos_pairs(indices_tuple, labels):
    """(a, p): the first positive pair for each distinct anchor label, sorted by label."""
    # references are the batch itself: the diagonal is not a positive pair
    a, p, _, _ = to_pairs(indices_tuple, labels, labels, True)
    if len(a) == 0:
        return a, p
    _, inverse = torch.unique(labels[a], sorted=True, return_inverse=True)
    # position of the first pair of each label = the smallest position mapping to it
    n_labels = int(inverse.max()) + 1
    positions = torch.arange(len(a), device=a.device)
    first = torch.full((n_labels,), len(a), dtype=torch.long, device=a.device)
    first = first.scatter_reduce(0, inverse, positions, reduce="amin")
    return a[first], p[first]


@register_loss("NPairsLoss", DotProductSimilarity, MeanReducer, supports_ref_emb=False)
def npairs_loss_dict(inp: LossInputs):
    if inp.labels is None:  # pairs are chosen by label even when an indices_tuple is given
        raise ValueError("NPairsLoss needs labels (an indices_tuple alone is not enough)")
    a, p = unique_label_pos_pairs(inp.indices_tuple, inp.labels)
    if len(a) == 0:
        return {"loss": {"losses": 0, "indices": None, "reduction_type": "already_reduced"}}
    sim = inp.distance(inp.embeddings[a], inp.embeddings[p])  # K × K, K = number of labels kept
    logits = sim if inp.distance.is_inverted else -sim
    targets = torch.arange(len(a), device=logits.device)
    losses = F.cross_entropy(logits, targets, reduction="none")
    return {"loss": {"losses": losses, "indices": a, "reduction_type": "element"}}
