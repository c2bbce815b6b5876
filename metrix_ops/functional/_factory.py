"""Builds the functional form of a registered loss: `f(embeddings, labels=None,
indices_tuple=None, ref_emb=None, ref_labels=None, *, <hyper-parameters>, **options)`."""
from __future__ import annotations

from ..driver import run_loss


def loss_function(fn_name: str, loss_name: str, **defaults):
    def fn(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None,
           **kwargs):
        params = dict(defaults)
        for k in list(kwargs):
            if k in params:
                params[k] = kwargs.pop(k)
        return run_loss(loss_name, params, embeddings, labels, indices_tuple, ref_emb,
                        ref_labels, **kwargs)

    fn.__name__ = fn.__qualname__ = fn_name
    fn.__doc__ = (f"Functional {loss_name}. Hyper-parameters (keyword): "
                  + ", ".join(f"{k}={v!r}" for k, v in defaults.items())
                  + ". Options: distance, reducer, backend, metrix, expansion, lam, "
                  "mixed_embeddings, mixed, miner, embedding_regularizer, "
                  "embedding_reg_weight.")
    return fn
