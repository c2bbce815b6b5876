"""mo.metrics.get_accuracy against PML's AccuracyCalculator (brute-force CustomKNN, the same
sklearn KMeans), Recall@K against a dense brute force, chunking, and bad input."""
import math

import numpy as np
import pytest
import torch
from pytorch_metric_learning.distances import CosineSimilarity, LpDistance
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN

import metrix_ops as mo
from metrix_ops.metrics import cluster_labels

PML_KEYS = ("precision_at_1", "r_precision", "mean_average_precision_at_r",
            "mean_average_precision", "mean_reciprocal_rank", "NMI", "AMI")


def pml_accuracy(query, ql, ref=None, rl=None, ref_includes_query=False, k=None,
                 distance="euclidean", seed=0):
    dist = LpDistance(normalize_embeddings=False) if distance == "euclidean" else CosineSimilarity()
    calc = AccuracyCalculator(k=k, device=torch.device("cpu"), knn_func=CustomKNN(dist),
                              kmeans_func=lambda x, n: cluster_labels(x, n, seed))
    return calc.get_accuracy(query, ql, ref, rl, ref_includes_query)


def data(n, d, labels, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), labels


def skewed_labels(n, seed):
    # class c drawn with weight 2^-c: a few large classes and some singletons
    g = torch.Generator().manual_seed(seed)
    w = torch.tensor([2.0 ** -c for c in range(9)])
    return torch.multinomial(w, n, replacement=True, generator=g)


def rand_labels(n, c, seed):
    return torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(seed))


def case(name, dtype):
    """(query, query_labels, reference, reference_labels, ref_includes_query)"""
    if name == "self":
        q, ql = data(97, 7, rand_labels(97, 5, 1), dtype, 1)
        return q, ql, None, None, False
    if name == "separate":
        q, ql = data(61, 6, rand_labels(61, 4, 2), dtype, 2)
        r, rl = data(83, 6, rand_labels(83, 4, 3), dtype, 3)
        return q, ql, r, rl, False
    if name == "absent_labels":  # query classes 4, 5 have no reference items
        q, ql = data(53, 5, rand_labels(53, 6, 4), dtype, 4)
        r, rl = data(71, 5, rand_labels(71, 4, 5), dtype, 5)
        return q, ql, r, rl, False
    if name == "one_class":
        q, ql = data(41, 3, torch.zeros(41, dtype=torch.long), dtype, 6)
        return q, ql, None, None, False
    if name == "imbalanced":
        q, ql = data(113, 9, skewed_labels(113, 7), dtype, 7)
        return q, ql, None, None, False
    if name == "ref_includes_query":  # reference = query followed by more items
        q, ql = data(37, 5, rand_labels(37, 3, 8), dtype, 8)
        extra, el = data(29, 5, rand_labels(29, 3, 9), dtype, 9)
        return q, ql, torch.cat([q, extra]), torch.cat([ql, el]), True
    raise KeyError(name)


CASES = ["self", "separate", "absent_labels", "one_class", "imbalanced", "ref_includes_query"]


def assert_matches_pml(ours, theirs):
    for key in PML_KEYS:
        a, b = ours[key], theirs[key]
        if math.isnan(b):
            assert math.isnan(a), key
            continue
        # PML averages the reciprocal ranks in fp32; everything else is fp64 in both
        rtol = 1e-5 if key == "mean_reciprocal_rank" else 1e-6
        assert a == pytest.approx(b, rel=rtol, abs=1e-12), (key, a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("name", CASES)
def test_matches_pml_and_chunk_size_does_not_matter(name, distance, dtype):
    q, ql, r, rl, riq = case(name, dtype)
    theirs = pml_accuracy(q, ql, r, rl, riq, distance=distance)
    results = [mo.metrics.get_accuracy(q, ql, r, rl, riq, include=PML_KEYS + ("recall_at_1",),
                                       distance=distance, chunk_size=cs)
               for cs in (1, 7, 10_000)]
    assert results[0] == results[1] == results[2]
    assert_matches_pml(results[0], theirs)
    if not math.isnan(results[0]["precision_at_1"]):
        assert results[0]["recall_at_1"] == results[0]["precision_at_1"]


@pytest.mark.parametrize("k", [None, "max_bin_count", 70, 3, 1, 10_000])
@pytest.mark.parametrize("name", ["self", "separate", "imbalanced"])
def test_k_matches_pml(name, k):
    """k=3 and 1 are below the largest class: PML truncates R-precision and MAP@R; so do we."""
    q, ql, r, rl, riq = case(name, torch.float32)
    if k == 10_000:  # PML's topk fails beyond the reference size; we clip, which is PML at k=|R|
        theirs = pml_accuracy(q, ql, r, rl, riq, k=None)
    else:
        theirs = pml_accuracy(q, ql, r, rl, riq, k=k)
    with pytest.warns(UserWarning, match="truncated") if k in (3, 1) else _no_warning():
        # recall_at_16 makes us fetch more than k neighbours: PML's metrics must still see k
        ours = mo.metrics.get_accuracy(q, ql, r, rl, riq, k=k, include=PML_KEYS + ("recall_at_16",),
                                       chunk_size=16)
    assert_matches_pml(ours, theirs)


class _no_warning:
    def __enter__(self):
        import warnings
        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


def test_default_keys_and_python_floats():
    q, ql, *_ = case("self", torch.float32)
    res = mo.metrics.get_accuracy(q, ql)
    assert list(res) == ["precision_at_1", "r_precision", "mean_average_precision_at_r", "NMI",
                         "recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8"]
    assert all(type(v) is float for v in res.values())
    res = mo.metrics.get_accuracy(q, ql, recall_ks=(3,), exclude=("NMI", "r_precision"))
    assert list(res) == ["precision_at_1", "mean_average_precision_at_r", "recall_at_3"]
    # numpy arrays are accepted, as PML accepts them
    assert mo.metrics.get_accuracy(q.numpy(), ql.numpy(), include=["recall_at_2"]) == \
        mo.metrics.get_accuracy(q, ql, include=["recall_at_2"])


def dense_recall(q, ql, r, rl, self_ref, K, distance):
    """Brute force on the full matrix: the K nearest other items, any of them same label?"""
    if distance == "cosine":
        d = -(torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(r, dim=1).T)
    else:
        d = torch.cdist(q, r)
    hits = []
    for i in range(len(q)):
        order = [j for j in torch.argsort(d[i]).tolist() if not (self_ref and j == i)]
        relevant = [j for j in order if rl[j] == ql[i]]
        if relevant:  # queries with nothing to find are left out, as PML leaves them out
            hits.append(any(rl[j] == ql[i] for j in order[:K]))
    return float(np.mean(hits)) if hits else math.nan


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("name", CASES)
def test_recall_at_k_matches_dense_brute_force(name, distance):
    q, ql, r, rl, riq = case(name, torch.float64)
    ks = (1, 2, 4, 8, 16, 500)  # 500 > every reference set: sees everything
    got = mo.metrics.recall_at_k(q, ql, r, rl, riq, ks=ks, distance=distance, chunk_size=5)
    self_ref = r is None or riq
    r, rl = (q, ql) if r is None else (r, rl)
    for K in ks:
        assert got[K] == pytest.approx(dense_recall(q, ql, r, rl, self_ref, K, distance), abs=1e-12)


def test_all_queries_lone_gives_nan_like_pml():
    q, ql = data(12, 4, torch.arange(12), torch.float32, 10)  # every class a singleton
    theirs = pml_accuracy(q, ql)
    with pytest.warns(UserWarning, match="None of the query labels"):
        ours = mo.metrics.get_accuracy(q, ql, include=PML_KEYS + ("recall_at_2",))
    assert_matches_pml(ours, theirs)
    assert math.isnan(ours["recall_at_2"]) and not math.isnan(ours["NMI"])


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_no_product_has_more_rows_than_chunk(monkeypatch, chunk):
    """Falsifiable: every torch.mm / torch.topk the metrics call sees at most `chunk` query
    rows, and there is one of each per chunk."""
    q, ql = data(150, 6, rand_labels(150, 3, 11), torch.float32, 11)
    seen = {"mm": [], "topk": []}
    real_mm, real_topk = torch.mm, torch.topk

    def mm(a, b, *args, **kw):
        out = real_mm(a, b, *args, **kw)
        seen["mm"].append(tuple(out.shape))
        return out

    def topk(x, *args, **kw):
        seen["topk"].append(tuple(x.shape))
        return real_topk(x, *args, **kw)

    monkeypatch.setattr(torch, "mm", mm)
    monkeypatch.setattr(torch, "topk", topk)
    res = mo.metrics.get_accuracy(q, ql, exclude=("NMI",), chunk_size=chunk)
    n_chunks = -(-150 // chunk)
    assert len(seen["mm"]) == n_chunks and len(seen["topk"]) == n_chunks
    assert max(s[0] for s in seen["mm"] + seen["topk"]) == min(chunk, 150)
    monkeypatch.undo()
    assert res == mo.metrics.get_accuracy(q, ql, exclude=("NMI",), chunk_size=1000)


def test_bad_input():
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    ga = mo.metrics.get_accuracy
    with pytest.raises(ValueError, match="query must be 2-D"):
        ga(torch.randn(10), y)
    with pytest.raises(ValueError, match="query is empty"):
        ga(torch.randn(0, 4), y[:0])
    with pytest.raises(ValueError, match="query contains NaN"):
        ga(torch.full((10, 4), float("nan")), y)
    with pytest.raises(ValueError, match="query_labels has 9 entries"):
        ga(x, y[:9])
    with pytest.raises(TypeError, match="query_labels must hold integer"):
        ga(x, y.float())
    with pytest.raises(TypeError, match="query must be a torch.Tensor"):
        ga([[1.0, 2.0]], y)
    with pytest.raises(ValueError, match="reference has embedding_dim 5"):
        ga(x, y, torch.randn(6, 5), torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="reference_labels has 5 entries"):
        ga(x, y, torch.randn(6, 4), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="reference_labels is required"):
        ga(x, y, torch.randn(6, 4))
    with pytest.raises(ValueError, match="reference_labels was given without reference"):
        ga(x, y, None, y)
    with pytest.raises(ValueError, match="ref_includes_query"):
        ga(x, y, torch.randn(12, 4), torch.zeros(12, dtype=torch.long), ref_includes_query=True)
    for k in (0, -1, 2.5, True, "max"):
        with pytest.raises(ValueError, match="k must be"):
            ga(x, y, k=k)
    with pytest.raises(ValueError, match="unknown metric 'recall@1'"):
        ga(x, y, include=("recall@1",))
    with pytest.raises(ValueError, match="unknown metric 'nmi'"):
        ga(x, y, exclude=("nmi",))
    with pytest.raises(TypeError, match="include must be a tuple or list"):
        ga(x, y, include="NMI")
    with pytest.raises(ValueError, match="recall_ks"):
        ga(x, y, recall_ks=(0, 1))
    with pytest.raises(ValueError, match="distance must be"):
        ga(x, y, distance="manhattan")
    with pytest.raises(ValueError, match="chunk_size"):
        ga(x, y, chunk_size=0)
    with pytest.raises(ValueError, match="ks must be"):
        mo.metrics.recall_at_k(x, y, ks=())
