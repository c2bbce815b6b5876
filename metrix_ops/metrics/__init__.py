"""Retrieval metrics: PML AccuracyCalculator's values (precision_at_1, r_precision,
MAP@R, NMI, ...) plus Recall@K, computed in query chunks; and the Metrix paper's utilization."""
from ..reference.utilization import utilization
from .clustering import cluster_labels
from .retrieval import get_accuracy, recall_at_k

__all__ = ["utilization", "get_accuracy", "recall_at_k", "cluster_labels"]
