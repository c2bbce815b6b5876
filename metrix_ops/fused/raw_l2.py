"""The L2 distance of rows as they are (LpDistance(normalize_embeddings=False), p = 2: the
person re-identification setting) through the ops written for unit rows.

Those ops read an L2 distance off a dot product s as √(2 − 2s) (the squared form as
2 − 2s). Rows lifted by two columns,

    x̃ = [x, 1 − ‖x‖²/2, 1],   r̃ = [r, 1, −‖r‖²/2],

have x̃·r̃ = 1 − ‖x − r‖²/2, so the same ops on (x̃, r̃) give ‖x − r‖, and their
gradients in x̃ and r̃ reach x and r through the two columns by autograd: no op changes.
This is torch.cdist's own Gram form (‖x‖² + ‖r‖² − 2x·r, which PML's LpDistance computes
past 25 rows a side), so the values agree to its rounding: an absolute error in d² of a
few ulps of max(1, ‖x‖², ‖r‖²). The lifted anchors differ from the lifted references, so
a batch against itself runs an op's general form (self pairs left out by index), not its
symmetric one: twice the symmetric op's products.

The ops that read distances through torch.cdist itself (the all-triplets ops) take the raw
rows instead (their backward adds cdist's radial term, see triplet_cpu.cpp), and so do the
CPU symmetric ops and the Triton kernels' RAW form, which rewrite each product as
1 − d²/2 from the rows' norms (sym_blocks.h: raw_to_unit_sims, triton/tiles.py:
raw_unit_sims) with a zero threshold scaled by the norms."""
from __future__ import annotations

import torch

from ..distances import is_raw_l2


def raw_at(inp, powers=(1, 2)) -> bool:
    """Whether the call's distance is the L2 of raw rows at one of `powers` (1: L2, 2: its
    square), on any device (the Triton engine's rule: its kernels take rows of any width)."""
    d = inp.distance
    return is_raw_l2(d) and d.power in powers


def raw_on_cpu(inp, powers=(1, 2)) -> bool:
    """raw_at, on CPU tensors: the CUDA engine shares the CPU glue, and its ops have not run
    lifted rows on a GPU."""
    return raw_at(inp, powers) and inp.embeddings.device.type == "cpu"


def lift_rows(x: torch.Tensor, r: torch.Tensor):
    """(x̃, r̃) with x̃·r̃ = 1 − ‖x − r‖²/2 (module docstring); r may be x."""
    nx = x.square().sum(1, keepdim=True)
    nr = nx if r is x else r.square().sum(1, keepdim=True)
    one_x, one_r = torch.ones_like(nx), torch.ones_like(nr)
    return torch.cat([x, 1 - nx / 2, one_x], 1), torch.cat([r, one_r, nr / -2], 1)
