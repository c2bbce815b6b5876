"""CircleLoss through the fused streaming op: per-anchor terms from circle_fwd (no B×M
matrix), then any reducer, as the reference. Covers CosineSimilarity (the only distance PML
accepts; others raise in the reference) with no indices_tuple."""
from __future__ import annotations

from ..ops.circle import circle_rows
from . import register
from .ntxent import guarded, reduce_rows, supports, unit_pair


def impl(params, inp, reducer, chunk=None):
    def compute(_n_pos):
        xu, ru = unit_pair(inp)
        rows = circle_rows(xu, ru, inp.labels, inp.ref_labels, inp.same_set, params["m"],
                           params["gamma"], chunk)
        return reduce_rows(rows, reducer, inp.embeddings)

    # PML: zero unless some pair list has two entries; an anchor lacking a side gives 0
    return guarded(compute, inp, need_both=False)


register("cpu", "CircleLoss", supports, impl)
