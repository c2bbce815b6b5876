"""Clustering quality (NMI, AMI) as PML's AccuracyCalculator computes it: k-means on the
query embeddings with one cluster per distinct query label, then sklearn's score of the
true labels against the cluster ids.

PML clusters with faiss by default; faiss is optional and its k-means is not reproducible
across builds, so we use scikit-learn's KMeans with a fixed `random_state`. PML gives the
same numbers when handed `kmeans_func=lambda x, n: cluster_labels(x, n, seed)`.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["cluster_labels", "clustering_scores", "CLUSTERING_METRICS"]

CLUSTERING_METRICS = ("NMI", "AMI")

# One k-means++ start, as sklearn's n_init="auto" does and as PML's faiss default (nredo=1):
# evaluation runs every epoch and k-means dominates its cost on large test sets.
N_INIT = 1


def cluster_labels(x: torch.Tensor, n_clusters: int, seed: int = 0,
                   n_init: int = N_INIT) -> np.ndarray:
    """k-means cluster id of every row of `x` (computed on the CPU in x's dtype)."""
    from sklearn.cluster import KMeans  # sklearn is only needed for these two metrics

    data = x.detach().cpu().numpy()
    return KMeans(n_clusters=n_clusters, n_init=n_init, random_state=seed).fit_predict(data)


def clustering_scores(x: torch.Tensor, labels: torch.Tensor, names, seed: int = 0) -> dict:
    """{name: score} for the requested names among CLUSTERING_METRICS."""
    from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

    truth = labels.detach().cpu().numpy()
    clusters = cluster_labels(x, int(np.unique(truth).size), seed)
    fns = {"NMI": normalized_mutual_info_score, "AMI": adjusted_mutual_info_score}
    return {n: float(fns[n](truth, clusters)) for n in names}
