"""The L2 distance of rows as they are (LpDistance(normalize_embeddings=False), p = 2: the
person re-identification setting) through the ops written for unit rows.

Those ops read an L2 distance off a dot product s as √(2 − 2s) (the squared form as
2 − 2s). On raw rows they rewrite each product as the similarity unit rows would have at
the same distance, 1 − d²/2 with d² = ‖x‖² + ‖r‖² − 2x·r from the rows' squared norms, d²
below a threshold scaled by the norms (raw_zero_eps) taken as 0: the CPU ops told `raw`
(sym_blocks.h: raw_to_unit_sims, self_walk.h's Walk::sq), the Triton kernels' RAW form
(triton/tiles.py: raw_unit_sims), and the listed pairs of an indices_tuple
(raw_l2_of_pairs). This is torch.cdist's own Gram form (what PML's LpDistance computes past
25 rows a side), so the values agree to its rounding, and coincident rows get d = 0 as
exact differences give; the gradients gain d²'s radial part, −(Σ_j G_ij)·x_i. The CPU's
all-triplets ops read the distances through torch.cdist itself (their backward adds cdist's
radial term, see triplet_cpu.cpp; the squared form as 1 − d²/2 of that d, `raw_sq`): PML's
values, exact differences up to 25 rows a side, and past that cdist's Gram form with its
noise for coincident rows, as PML's.

(Until the forty-seventh session some calls took rows lifted by two columns,
x̃ = [x, 1 − ‖x‖²/2, 1] and r̃ = [r, 1, −‖r‖²/2], whose product is 1 − ‖x − r‖²/2: the same
Gram form, but coincident rows kept a noise distance, and a batch against itself became a
general call.)"""
from __future__ import annotations

import torch

from ..distances import is_raw_l2


def raw_at(inp, powers=(1, 2)) -> bool:
    """Whether the call's distance is the L2 of raw rows at one of `powers` (1: L2, 2: its
    square), on any device (the Triton engine's rule: its kernels take rows of any width)."""
    d = inp.distance
    return is_raw_l2(d) and d.power in powers


def raw_on_cpu(inp, powers=(1, 2)) -> bool:
    """raw_at, on CPU tensors: the CUDA engine shares the CPU glue, and its ops take no raw
    rows (their `raw` argument is CPU-only)."""
    return raw_at(inp, powers) and inp.embeddings.device.type == "cpu"


def raw_zero_eps(x: torch.Tensor) -> float:
    """The zero threshold of d² for rows of any norm, relative to max(‖x_i‖², ‖r_j‖²): 2·√D
    ulps of the accumulation type. The rounding of coincident rows' d² in the product form
    was measured at ~½√D ulps (up to 12 at D = 128–1024); a wider bound zeroes real
    distances of long rows (8√D ulps zeroed d = 0.2 at norm 68 in fp32). The CPU ops'
    raw_to_unit_sims rule (sym_blocks.h), the Triton kernels' (tiles.raw_unit_sims) and the
    listed pairs' (raw_l2_of_pairs)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return 2 * max(1.0, x.shape[1] ** 0.5) * torch.finfo(acc).eps


def raw_l2_of_pairs(s, sq_rows, sq_cols, power: int, eps: float):
    """‖x_i − r_j‖ (power 1) or its square (power 2) of listed pairs from their products
    s = x_i·r_j and the rows' squared norms (gathered per pair): d² = ‖x_i‖² + ‖r_j‖² − 2s,
    taken as 0 below eps·max(‖x_i‖², ‖r_j‖²) (raw_zero_eps: coincident rows get d = 0 and a
    zero gradient, as cdist's exact differences). Differentiable through s and the norms,
    so the gradient has d²'s radial part."""
    q = (sq_rows + sq_cols) - 2 * s
    return l2_where(q, q > eps * torch.maximum(sq_rows, sq_cols).detach(), power)


def l2_where(q, keep, power: int):
    """d² (power 2) or d (power 1) from d² = q where `keep`, else exactly 0 with a zero
    gradient there (as torch.cdist's backward at d = 0, never √0's inf)."""
    if power == 2:
        return torch.where(keep, q, torch.zeros_like(q))
    return torch.where(keep, torch.sqrt(torch.where(keep, q, torch.ones_like(q))),
                       torch.zeros_like(q))
