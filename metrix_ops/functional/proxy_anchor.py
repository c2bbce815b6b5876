"""The functional ProxyAnchorLoss: the caller owns the proxies."""
from __future__ import annotations

from ..driver import run_loss

__all__ = ["proxy_anchor_loss"]


def proxy_anchor_loss(embeddings, labels=None, indices_tuple=None, ref_emb=None,
                      ref_labels=None, *, proxies=None, margin=0.1, alpha=32.0, **options):
    """Functional `ProxyAnchorLoss` (PML's) with explicit `proxies` (num_classes × D,
    required; gradients flow to them). indices_tuple reweights examples as in PML; ref_emb
    is refused. `options`: distance, reducer, backend, metrix, lam, mixed_embeddings, mixed,
    embedding_regularizer, embedding_reg_weight, weight_regularizer (on `proxies`),
    weight_reg_weight."""
    params = {"proxies": proxies, "margin": margin, "alpha": alpha}
    return run_loss("ProxyAnchorLoss", params, embeddings, labels, indices_tuple, ref_emb,
                    ref_labels, **options)
