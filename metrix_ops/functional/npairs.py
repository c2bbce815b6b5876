"""The functional NPairsLoss."""
from __future__ import annotations

from ..driver import run_loss

__all__ = ["npairs_loss"]


def npairs_loss(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None,
                **options):
    """Functional `NPairsLoss` (PML's): one positive pair per label, cross-entropy of each
    kept anchor over the kept positives; mean. ref_emb is refused, as in PML. `options`:
    distance, reducer, backend, metrix, expansion, lam, mixed_embeddings, mixed."""
    return run_loss("NPairsLoss", {}, embeddings, labels, indices_tuple, ref_emb, ref_labels,
                    **options)
