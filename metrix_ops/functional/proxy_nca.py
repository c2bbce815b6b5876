"""The functional ProxyNCALoss (with the ProxyNCA++ options): the caller owns the proxies."""
from __future__ import annotations

from ..driver import run_loss

__all__ = ["proxy_nca_loss"]


def proxy_nca_loss(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None,
                   *, proxies=None, softmax_scale=1.0, temperature=None, normalize_proxies=None,
                   **options):
    """Functional `ProxyNCALoss` (PML's) with explicit `proxies` (num_classes × D, required;
    gradients flow to them). ProxyNCA++: `temperature` divides the logits,
    `normalize_proxies` True/False forces normalised/raw proxies (None: as PML, the
    distance decides). ref_emb is refused. `options`: distance, reducer, backend, metrix,
    lam, mixed_embeddings, mixed, embedding_regularizer, embedding_reg_weight,
    weight_regularizer (on `proxies`), weight_reg_weight."""
    params = {"proxies": proxies, "softmax_scale": softmax_scale, "temperature": temperature,
              "normalize_proxies": normalize_proxies}
    return run_loss("ProxyNCALoss", params, embeddings, labels, indices_tuple, ref_emb,
                    ref_labels, **options)
