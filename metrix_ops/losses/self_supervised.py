"""PML's SelfSupervisedLoss: a loss over two views of one batch, row i of each view its own
class (SimCLR's setting: `SelfSupervisedLoss(NTXentLoss(temperature=0.1))`)."""
from __future__ import annotations

import torch

from ..validation import check_embeddings
from .base import BaseMetricLoss

__all__ = ["SelfSupervisedLoss"]

# PML's list, less the losses metrix_ops does not have (Angular, IntraPairVariance,
# SignalToNoiseRatioContrastive, NCA, TupletMargin)
SUPPORTED = ("CircleLoss", "ContrastiveLoss", "GeneralizedLiftedStructureLoss",
             "LiftedStructureLoss", "MultiSimilarityLoss", "NTXentLoss", "SupConLoss",
             "TripletMarginLoss")


class SelfSupervisedLoss(torch.nn.Module):
    """loss(embeddings, ref_emb): labels 0..B−1 for both views. symmetric=True (PML's
    default): the loss of the 2B rows [embeddings; ref_emb] against themselves, each class a
    pair of views; symmetric=False: embeddings as queries against ref_emb (ref_emb=,
    ref_labels=). The wrapped loss's options (backend, Metrix, EE, regularizers) apply as on
    any call; the labels are made on the embeddings' device."""

    def __init__(self, loss, symmetric: bool = True):
        super().__init__()
        name = type(loss).__name__
        if not isinstance(loss, BaseMetricLoss) or name not in SUPPORTED:
            raise TypeError(f"SelfSupervisedLoss wraps one of metrix_ops' {', '.join(SUPPORTED)}"
                            f" (as PML's), got {name}")
        if not isinstance(symmetric, bool):
            raise TypeError(f"symmetric must be a bool, got {type(symmetric).__name__}")
        self.loss = loss
        self.symmetric = symmetric

    def forward(self, embeddings, ref_emb, *, lam=None):
        check_embeddings(embeddings, allow_empty=True)
        check_embeddings(ref_emb, "ref_emb", allow_empty=True)
        if ref_emb.shape != embeddings.shape:
            raise ValueError(f"ref_emb must be the second view of the batch, of the embeddings' "
                             f"shape {tuple(embeddings.shape)}; got {tuple(ref_emb.shape)}")
        if ref_emb.device != embeddings.device:
            raise ValueError(f"ref_emb is on {ref_emb.device} but embeddings is on "
                             f"{embeddings.device}")
        labels = torch.arange(embeddings.shape[0], device=embeddings.device)
        if self.symmetric:
            return self.loss(torch.cat([embeddings, ref_emb]), torch.cat([labels, labels]),
                             lam=lam)
        return self.loss(embeddings, labels, ref_emb=ref_emb, ref_labels=labels.clone(), lam=lam)
