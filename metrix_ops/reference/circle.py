"""CircleLoss (Sun et al. 2020), PML's pair-label form: per anchor
softplus(log Σ_P e^{−γ[O_p − s]₊(s − Δ_p)} + log Σ_N e^{γ[s − O_n]₊(s − Δ_n)}), the weights
[·]₊ detached (as the paper and PML), anchors lacking a positive or a negative give 0;
AvgNonZero reduced."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..distances import BaseDistance, CosineSimilarity, DotProductSimilarity
from ..reducers import AvgNonZeroReducer
from ..spec import LossInputs, register_loss
from .lse import masked_logsumexp
from .pairs import mat_and_masks


@register_loss("CircleLoss", CosineSimilarity, AvgNonZeroReducer)
def circle_loss_dict(inp: LossInputs, m=0.4, gamma=80.0):
    # PML asserts isinstance(distance, CosineSimilarity); there DotProductSimilarity is the
    # parent class, so it is refused too (ours has the hierarchy the other way round)
    d = inp.distance
    ours = isinstance(d, CosineSimilarity) and not isinstance(d, DotProductSimilarity)
    # a subclass of PML's CosineSimilarity (kept as it is: distances.as_distance) passes
    # PML's isinstance too
    theirs = (not isinstance(d, BaseDistance)
              and any(c.__name__ == "CosineSimilarity" for c in type(d).__mro__[1:]))
    if not (ours or theirs):
        raise ValueError(f"CircleLoss requires the distance to be CosineSimilarity (as PML), "
                         f"got {type(d).__name__}")
    found = mat_and_masks(inp)
    if found is None:
        return {"loss": {"losses": 0, "indices": None, "reduction_type": "already_reduced"}}
    s, pos, neg = found
    # optima O_p, O_n and decision margins Δ_p, Δ_n of the paper, from the one relaxation m
    op, on, delta_p, delta_n = 1 + m, -m, 1 - m, m
    # the weights α_p = [O_p − s]₊, α_n = [s − O_n]₊ are constants of the step (detached)
    logit_p = -gamma * F.relu(op - s.detach()) * (s - delta_p)
    logit_n = gamma * F.relu(s.detach() - on) * (s - delta_n)
    lse_p = masked_logsumexp(logit_p, pos, add_one=False)
    lse_n = masked_logsumexp(logit_n, neg, add_one=False)
    losses = F.softplus(lse_p + lse_n).squeeze(1)
    # PML zeroes anchors lacking a positive or a negative (the empty side's log-sum-exp is 0,
    # so they would otherwise pay softplus of the other side alone); AvgNonZero then leaves
    # them out of the mean
    valid = pos.any(1) & neg.any(1)
    losses = losses * valid.to(losses.dtype)
    return {"loss": {"losses": losses, "indices": torch.arange(len(losses), device=s.device),
                     "reduction_type": "element"}}
