"""Retrieval metrics equal to PML's AccuracyCalculator (avg_of_avgs=False, labels compared
by equality), plus Recall@K, without ever holding the |Q|×|R| distance matrix.

Query rows are processed in chunks: a chunk × |R| score block from one matrix product,
top-k of it, and the per-query metric values of that chunk; only those values (O(|Q|))
outlive the chunk. PML instead keeps the k-NN index matrix, which for k=None is |Q|×|R|.

Semantics carried over from PML (see the notes by each formula):
* R (a query's number of relevant items) is the count of its label in the reference,
  minus one when the reference contains the query (the query never retrieves itself).
* Queries with R = 0 ("lone" queries) are left out of every k-NN metric; if every query
  is lone those metrics are NaN (with a warning). NMI/AMI still use every query.
* k=None: PML retrieves every reference. Only mean_average_precision and
  mean_reciprocal_rank can see beyond max R, so we fetch only as many neighbours as the
  requested metrics can see; the values are PML's k=None values. k larger than the
  number of references is clipped to it (PML would fail inside topk).
* An explicit k < max R truncates r_precision to min(k, R) columns but MAP@R still divides
  by the full R, exactly as PML does (it warns; so do we).

Ties: neighbours at equal scores come in torch.topk's order, which is not specified. Self
is excluded by index, not by distance, so an exact duplicate of a query in the reference is
an ordinary neighbour (PML instead drops its last neighbour when duplicates push the query
itself out of its k+1 list, which only differs under exact ties).
"""
from __future__ import annotations

import math
import re
import warnings

import numpy as np
import torch

from ..validation import check_embeddings, check_labels
from .clustering import CLUSTERING_METRICS, clustering_scores

__all__ = ["get_accuracy", "recall_at_k", "DEFAULT_METRICS", "KNN_METRICS"]

DEFAULT_METRICS = ("precision_at_1", "r_precision", "mean_average_precision_at_r", "NMI")
# PML's remaining metrics: computed only when named in `include`.
KNN_METRICS = ("precision_at_1", "r_precision", "mean_average_precision_at_r",
               "mean_average_precision", "mean_reciprocal_rank")
_RECALL = re.compile(r"recall_at_([1-9][0-9]*)$")
_DISTANCES = ("euclidean", "cosine")


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _as_tensor(x):
    # PML accepts numpy arrays too; anything else gets check_*'s TypeError
    return torch.from_numpy(x) if isinstance(x, np.ndarray) else x


def _select(include, exclude, recall_ks):
    for name, v in (("include", include), ("exclude", exclude)):
        if v is not None and not isinstance(v, (tuple, list)):
            # a bare string would otherwise be iterated letter by letter
            raise TypeError(f"{name} must be a tuple or list of metric names, got {type(v).__name__}")
    if not isinstance(recall_ks, (tuple, list)) or not all(_is_int(k) and k >= 1 for k in recall_ks):
        raise ValueError(f"recall_ks must be a tuple or list of integers >= 1, got {recall_ks!r}")
    # include=None or () means the defaults, as PML's include=() means "all"
    names = list(include) if include else (
        list(DEFAULT_METRICS) + [f"recall_at_{k}" for k in recall_ks])
    known = KNN_METRICS + CLUSTERING_METRICS
    for n in names + list(exclude or ()):
        if not isinstance(n, str) or (n not in known and not _RECALL.match(n)):
            raise ValueError(f"unknown metric {n!r} in include/exclude; known: "
                             f"{', '.join(known)}, recall_at_<K>")
    drop = set(exclude or ())
    return [n for n in dict.fromkeys(names) if n not in drop]


def _check_inputs(query, query_labels, reference, reference_labels, ref_includes_query):
    query, query_labels = _as_tensor(query), _as_tensor(query_labels)
    check_embeddings(query, "query")
    check_labels(query_labels, query.shape[0], query.device, "query_labels")
    if reference is None:
        if reference_labels is not None:
            raise ValueError("reference_labels was given without reference")
        return query, query_labels, query, query_labels, True
    if reference_labels is None:
        raise ValueError("reference_labels is required when reference is given")
    reference, reference_labels = _as_tensor(reference), _as_tensor(reference_labels)
    check_embeddings(reference, "reference")
    check_labels(reference_labels, reference.shape[0], reference.device, "reference_labels")
    if reference.shape[1] != query.shape[1]:
        raise ValueError(f"reference has embedding_dim {reference.shape[1]} but query has "
                         f"{query.shape[1]}")
    if reference.device != query.device:
        raise ValueError(f"reference is on {reference.device} but query is on {query.device}")
    if ref_includes_query:
        # self-exclusion is by index, so query row i must be reference row i (PML's check)
        n = query.shape[0]
        if (reference.shape[0] < n or not torch.allclose(query, reference[:n].to(query.dtype))
                or not torch.equal(query_labels, reference_labels[:n])):
            raise ValueError("ref_includes_query=True needs the first len(query) rows of "
                             "reference / reference_labels to equal query / query_labels")
    return query, query_labels, reference, reference_labels, bool(ref_includes_query)


def _relevant_counts(query_labels, reference_labels, self_ref):
    """R per query: reference items sharing its label, itself not counted."""
    uniq, counts = torch.unique(reference_labels, return_counts=True)
    pos = torch.searchsorted(uniq, query_labels.contiguous()).clamp_max(uniq.numel() - 1)
    found = uniq[pos] == query_labels
    return torch.where(found, counts[pos], torch.zeros_like(pos)) - int(self_ref)


def _neighbour_hits(q, r, r_sq, ref_labels, q_labels, start, self_ref, k_fetch):
    """hit[i, j]: does the j-th nearest reference of chunk row i share its label."""
    # larger score = nearer. Euclidean: ‖q−r‖² = ‖q‖² − (2q·r − ‖r‖²); ‖q‖² is the same
    # for the whole row, so ranking by 2q·r − ‖r‖² needs no clamp and no square root.
    scores = torch.mm(q, r.t())
    if r_sq is not None:
        scores.mul_(2).sub_(r_sq)
    if self_ref:
        rows = torch.arange(q.shape[0], device=q.device)
        scores[rows, rows + start] = float("-inf")  # never one's own neighbour
    idx = torch.topk(scores, k_fetch, dim=1, largest=True, sorted=True).indices
    return ref_labels[idx] == q_labels[:, None]


def _average_precision(eq, R):
    """Σ_j precision@j over the relevant hits in `eq`, divided by R (PML's MAP form)."""
    cols = torch.arange(1, eq.shape[1] + 1, device=eq.device, dtype=torch.float64)
    prec = eq.cumsum(1).to(torch.float64) * eq / cols
    return prec.sum(1) / R.clamp_min(1)


@torch.no_grad()
def _knn_metrics(q, ql, r, rl, self_ref, k, names, distance, chunk_size):
    R = _relevant_counts(ql, rl, self_ref)
    valid = R > 0
    if not bool(valid.any()):
        warnings.warn("None of the query labels are in the reference set: k-NN metrics are NaN")
        return {n: math.nan for n in names}
    avail = r.shape[0] - int(self_ref)  # references a query can retrieve
    max_r = int(R.max())
    # the k PML's metric functions would see
    k_pml = avail if k is None else max_r if k == "max_bin_count" else min(k, avail)
    if k_pml < max_r and {"r_precision", "mean_average_precision_at_r"} & set(names):
        warnings.warn(f"k={k} is less than the largest class size R={max_r}: r_precision and "
                      "mean_average_precision_at_r are truncated (use k=None or 'max_bin_count')")
    # columns each metric reads; fetch only the widest
    width = {"precision_at_1": 1, "r_precision": min(k_pml, max_r),
             "mean_average_precision_at_r": min(k_pml, max_r),
             "mean_average_precision": k_pml, "mean_reciprocal_rank": k_pml}
    for n in names:
        m = _RECALL.match(n)
        if m:
            width[n] = min(int(m.group(1)), avail)  # K beyond the references: all of them
    k_fetch = max(width[n] for n in names)

    dtype = torch.float64 if torch.float64 in (q.dtype, r.dtype) else torch.float32
    q, r = q.to(dtype), r.to(dtype)
    r_sq = None
    if distance == "cosine":
        q, r = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(r, dim=1)
    else:
        r_sq = (r * r).sum(1)
    per_query = {n: torch.zeros(q.shape[0], dtype=torch.float64, device=q.device) for n in names}
    cols = torch.arange(k_fetch, device=q.device)
    for s in range(0, q.shape[0], chunk_size):
        e = min(s + chunk_size, q.shape[0])
        hit = _neighbour_hits(q[s:e], r, r_sq, rl, ql[s:e], s, self_ref, k_fetch)
        Rc = R[s:e]
        # PML's relevance mask: the first min(k, R) columns
        rel = cols < Rc.clamp_max(k_pml)[:, None]
        for n in names:
            if n == "precision_at_1":
                v = hit[:, 0]
            elif n == "r_precision":
                v = (hit & rel).sum(1).to(torch.float64) / Rc.clamp(1, k_pml)
            elif n == "mean_average_precision_at_r":
                v = _average_precision(hit & rel, Rc)  # divides by R even when k < R (PML)
            elif n == "mean_average_precision":
                v = _average_precision(hit[:, :k_pml], Rc)
            elif n == "mean_reciprocal_rank":
                h = hit[:, :k_pml]
                first = h.to(torch.uint8).argmax(1)  # argmax returns the first maximum
                v = torch.where(h.any(1), 1.0 / (first.to(torch.float64) + 1.0), 0.0)
            else:  # recall_at_K: at least one relevant item among the K nearest
                v = hit[:, :width[n]].any(1)
            per_query[n][s:e] = v.to(torch.float64)
    return {n: float(per_query[n][valid].mean()) for n in names}


def get_accuracy(query, query_labels, reference=None, reference_labels=None,
                 ref_includes_query=False, k=None, include=None, exclude=(),
                 recall_ks=(1, 2, 4, 8), distance="euclidean", chunk_size=1024, seed=0):
    """PML AccuracyCalculator.get_accuracy's keys and values, plus recall_at_K.

    reference=None: every query is searched among the other queries. Default metrics:
    precision_at_1, r_precision, mean_average_precision_at_r, NMI and recall_at_K for K in
    recall_ks; `include` may also name mean_average_precision, mean_reciprocal_rank, AMI
    or any recall_at_K. distance: "euclidean" (nearest in L2, PML's default) or "cosine"
    (largest cosine similarity). k: None, "max_bin_count" or an int >= 1, as in PML.
    NMI/AMI: sklearn KMeans (random_state=seed) on the query embeddings.
    """
    q, ql, r, rl, self_ref = _check_inputs(query, query_labels, reference, reference_labels,
                                           ref_includes_query)
    names = _select(include, exclude, recall_ks)
    if not (k is None or k == "max_bin_count" or (_is_int(k) and k >= 1)):
        raise ValueError(f"k must be None, 'max_bin_count' or an integer >= 1, got {k!r}")
    if distance not in _DISTANCES:
        raise ValueError(f"distance must be one of {_DISTANCES}, got {distance!r}")
    if not (_is_int(chunk_size) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    if not _is_int(seed):
        raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
    out = {}
    knn = [n for n in names if n in KNN_METRICS or _RECALL.match(n)]
    if knn:
        out.update(_knn_metrics(q, ql, r, rl, self_ref, k, knn, distance, int(chunk_size)))
    clus = [n for n in names if n in CLUSTERING_METRICS]
    if clus:
        out.update(clustering_scores(q, ql, clus, int(seed)))
    return {n: out[n] for n in names}


def recall_at_k(query, query_labels, reference=None, reference_labels=None,
                ref_includes_query=False, ks=(1, 2, 4, 8), distance="euclidean",
                chunk_size=1024):
    """{K: Recall@K}: the fraction of queries (with any relevant reference) that have at
    least one same-label item among their K nearest references."""
    if not (isinstance(ks, (tuple, list)) and ks and all(_is_int(k) and k >= 1 for k in ks)):
        raise ValueError(f"ks must be a non-empty tuple or list of integers >= 1, got {ks!r}")
    res = get_accuracy(query, query_labels, reference, reference_labels, ref_includes_query,
                       include=[f"recall_at_{k}" for k in ks], distance=distance,
                       chunk_size=chunk_size)
    return {int(_RECALL.match(n).group(1)): v for n, v in res.items()}
