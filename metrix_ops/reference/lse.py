"""Masked log-sum-exp with PML's conventions, the stable form every exp-based loss uses."""
from __future__ import annotations

import torch

__all__ = ["masked_logsumexp"]


def masked_logsumexp(x: torch.Tensor, mask: torch.Tensor, add_one: bool, dim: int = 1) -> torch.Tensor:
    """log(Σ_{mask} e^x [+ 1]) along `dim` (keepdim); rows with an empty mask give 0.

    add_one adds e^0 inside the sum: log(1 + Σ e^x), as in MS / lifted losses."""
    neg_inf = torch.finfo(x.dtype).min if x.dtype.is_floating_point else float("-inf")
    x = x.masked_fill(~mask, neg_inf)
    if add_one:
        x = torch.cat([x, x.new_zeros(x.shape[0] if dim == 1 else 1, 1 if dim == 1 else x.shape[1])], dim=dim)
    out = torch.logsumexp(x, dim=dim, keepdim=True)
    return out.masked_fill(~mask.any(dim=dim, keepdim=True), 0)
