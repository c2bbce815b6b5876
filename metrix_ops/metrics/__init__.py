"""Retrieval metrics. Utilization is here from the start; Recall@K, MAP@R and NMI follow."""
from ..reference.utilization import utilization

__all__ = ["utilization"]
