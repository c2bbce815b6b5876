"""NPairsLoss (Sohn 2016), PML's semantics: one positive pair per label — the first pair,
in PML's pair order, whose anchor has that label — then cross-entropy of each anchor over
all the pairs' positives (target: its own); element reduced (mean)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..distances import DotProductSimilarity
from ..reducers import MeanReducer
from ..spec import LossInputs, register_loss
from .pairs import to_pairs


def unique_label_pos_pairs(indices_tuple, labels):
    a, p, _, _ = to_pairs(indices_tuple, labels, labels, True)
    if len(a) == 0:
        return a, p
    la = labels[a]
    uniq = torch.unique(la)  # sorted, as np.unique
    first = (la[None, :] == uniq[:, None]).to(torch.int8).argmax(dim=1)
    return a[first], p[first]


@register_loss("NPairsLoss", DotProductSimilarity, MeanReducer, supports_ref_emb=False)
def npairs_loss_dict(inp: LossInputs):
    a, p = unique_label_pos_pairs(inp.indices_tuple, inp.labels)
    if len(a) == 0:
        return {"loss": {"losses": 0, "indices": None, "reduction_type": "already_reduced"}}
    sim = inp.distance(inp.embeddings[a], inp.embeddings[p])
    if not inp.distance.is_inverted:
        sim = -sim
    targets = torch.arange(len(a), device=sim.device)
    losses = F.cross_entropy(sim, targets, reduction="none")
    return {"loss": {"losses": losses, "indices": a, "reduction_type": "element"}}
