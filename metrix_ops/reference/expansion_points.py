"""Embedding Expansion's synthetic points (CVPR 2020) in closed form from Gram entries.

Every point — original or synthetic — is a combination of the L2-normalised originals:
point k is c_k⁻¹(λ_k x̂_{u_k} + (1−λ_k) x̂_{w_k}) with c_k its norm (normalize=True) or 1.
An original is u = w, λ = 1. Their inner products are Λ G Λᵀ / (c cᵀ) with G = X̂X̂ᵀ and
Λ the P×B coefficient matrix, so no point is ever stacked as an embedding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Points:
    u: torch.Tensor  # P: first endpoint (the original itself for originals)
    w: torch.Tensor  # P: second endpoint
    lam: torch.Tensor  # P: weight of u
    labels: torch.Tensor  # P: class (synthetic points take their pair's class)
    is_original: torch.Tensor  # P bool


def positive_pairs(labels: torch.Tensor, pairs: str):
    """Segments (i, j) the synthetic points lie on: every unordered positive pair i < j, or
    (2t, 2t+1) for "adjacent" (the official pairing; it must be positive)."""
    b = len(labels)
    if pairs == "adjacent":
        if b % 2:
            raise ValueError(f"Expansion(pairs='adjacent') needs an even batch size, got {b}")
        i = torch.arange(0, b, 2, device=labels.device)
        bad = torch.where(labels[i] != labels[i + 1])[0]
        if len(bad):
            t = int(i[bad[0]])
            raise ValueError(f"Expansion(pairs='adjacent') pairs rows 2t and 2t+1, which must share "
                             f"a label (class-contiguous batch); rows {t} and {t + 1} have labels "
                             f"{int(labels[t])} and {int(labels[t + 1])}")
        return i, i + 1
    i, j = torch.where((labels[:, None] == labels[None, :]).triu(diagonal=1))
    return i, j


def build_points(labels: torch.Tensor, n_points: int, pairs: str) -> Points:
    b, dev = len(labels), labels.device
    orig = torch.arange(b, device=dev)
    u, w, lam = [orig], [orig], [torch.ones(b, dtype=torch.float64, device=dev)]
    if n_points > 0:
        i, j = positive_pairs(labels, pairs)
        for k in range(1, n_points + 1):  # x̄_k = (k x_i + (n+1−k) x_j)/(n+1)
            u.append(i)
            w.append(j)
            lam.append(torch.full((len(i),), k / (n_points + 1), dtype=torch.float64, device=dev))
    u, w, lam = torch.cat(u), torch.cat(w), torch.cat(lam)
    is_orig = torch.zeros(len(u), dtype=torch.bool, device=dev)
    is_orig[:b] = True
    return Points(u, w, lam, labels[u], is_orig)


def point_gram(x: torch.Tensor, pts: Points, normalize: bool):
    """(inner products P×P, squared norms P) of all points, from G = X̂X̂ᵀ."""
    xh = F.normalize(x, dim=1)
    G = xh @ xh.t()
    b = len(x)
    lam = pts.lam.to(x.dtype)
    coef = torch.zeros(len(pts.u), b, dtype=x.dtype, device=x.device)
    rows = torch.arange(len(pts.u), device=x.device)
    coef.index_put_((rows, pts.u), lam, accumulate=True)
    coef.index_put_((rows, pts.w), 1 - lam, accumulate=True)
    inner = coef @ G @ coef.t()
    sq = torch.diagonal(inner)
    if normalize:
        c = sq.clamp_min(0).sqrt().clamp_min(1e-12)
        inner = inner / (c[:, None] * c[None, :])
        sq = torch.ones_like(sq)
    return inner, sq
