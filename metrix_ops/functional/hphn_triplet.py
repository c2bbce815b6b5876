"""The functional HPHN triplet loss (the Embedding Expansion paper's batch-hard triplet)."""
from __future__ import annotations

from ..driver import run_loss
from ..losses.hphn_triplet import reduction_reducer

__all__ = ["hphn_triplet_loss"]


def hphn_triplet_loss(embeddings, labels=None, indices_tuple=None, ref_emb=None,
                      ref_labels=None, *, margin=0.2, reduction="mean", expansion=None,
                      distance=None, backend="auto", **options):
    """Functional `HPHNTripletLoss` (same positional layout as the other functional losses;
    an indices_tuple is refused, the loss mines its own triplets): the mean (or sum) over
    anchors with a positive and a negative of [d(x_i, farthest positive) − d(closest
    negative pair) + margin]₊; with `expansion=mo.Expansion(...)` the negative pair ranges
    over synthetic points too. `options` go to the driver (metrix=, lam=, ...).
    See `metrix_ops.losses.HPHNTripletLoss`."""
    if "reducer" in options:
        raise TypeError("hphn_triplet_loss takes reduction='mean'|'sum', not reducer=")
    return run_loss("HPHNTripletLoss", {"margin": margin}, embeddings, labels, indices_tuple,
                    ref_emb, ref_labels, distance=distance, reducer=reduction_reducer(reduction),
                    backend=backend, expansion=expansion, **options)
