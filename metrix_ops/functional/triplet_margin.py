"""The functional TripletMarginLoss."""
from __future__ import annotations

from ..driver import run_loss
from ..reference.triplet_margin import check_triplets_per_anchor

__all__ = ["triplet_margin_loss"]


def triplet_margin_loss(embeddings, labels=None, indices_tuple=None, ref_emb=None,
                        ref_labels=None, *, margin=0.05, swap=False, smooth_loss=False,
                        triplets_per_anchor="all", **options):
    """Functional `TripletMarginLoss` (PML's): [margin(d_ap, d_an) + margin]₊ over all
    triplets, the given indices_tuple, or `triplets_per_anchor` random ones per anchor;
    AvgNonZero by default. `options`: distance, reducer, backend, metrix, expansion, lam,
    mixed_embeddings, mixed. See `metrix_ops.losses.TripletMarginLoss`."""
    check_triplets_per_anchor(triplets_per_anchor)
    params = {"margin": margin, "swap": swap, "smooth_loss": smooth_loss,
              "triplets_per_anchor": triplets_per_anchor}
    return run_loss("TripletMarginLoss", params, embeddings, labels, indices_tuple, ref_emb,
                    ref_labels, **options)
