"""Our PML-style miners stream row blocks of the distance matrix: the same tuple as the
dense reference (`miner.reference`, the rule on the whole B×M matrix: same values, same
order) and as PML's miner (BatchHard and TripletMargin in PML's order, MultiSimilarity as
sets: PML orders its pairs by value), for the cases, distances, ref_emb and dtypes; and
no B×M matrix is formed."""
import pytest
import torch
from pytorch_metric_learning import distances as pd
from pytorch_metric_learning import miners as pm

import metrix_ops as mo
from cases import CASE_IDS, CASES, make_case
from metrix_ops.distances import BaseDistance

DISTS = {"default": None, "cos": pd.CosineSimilarity, "l2": pd.LpDistance,
         "lp_sq": lambda: pd.LpDistance(power=2),
         "lp_raw": lambda: pd.LpDistance(normalize_embeddings=False),
         "dot_raw": lambda: pd.DotProductSimilarity(normalize_embeddings=False)}
MINERS = {
    "batch_hard": (mo.miners.BatchHardMiner, pm.BatchHardMiner, {}),
    "ms": (mo.miners.MultiSimilarityMiner, pm.MultiSimilarityMiner, {"epsilon": 0.1}),
    "ms_wide": (mo.miners.MultiSimilarityMiner, pm.MultiSimilarityMiner, {"epsilon": 0.6}),
    **{f"tm_{t}": (mo.miners.TripletMarginMiner, pm.TripletMarginMiner,
                   {"margin": 0.2, "type_of_triplets": t})
       for t in ("all", "hard", "semihard", "easy")},
    "tm_all_0": (mo.miners.TripletMarginMiner, pm.TripletMarginMiner,
                 {"margin": 0.0, "type_of_triplets": "all"}),
}


def build(name, dist, entries=None):
    ours_cls, pml_cls, kw = MINERS[name]
    dk = {} if DISTS[dist] is None else {"distance": DISTS[dist]()}
    ours = ours_cls(**kw, **dk)
    if entries is not None:
        ours.block_entries = entries
    return ours, pml_cls(**kw, **dk)


def assert_same(ours, dense, pml, pairs: bool):
    assert len(ours) == len(dense)
    for a, b in zip(ours, dense):  # exactly the reference, order included
        assert a.dtype == torch.long and torch.equal(a, b)
    if pairs:  # PML orders each anchor's pairs by value
        for k in (0, 2):
            assert (sorted(zip(ours[k].tolist(), ours[k + 1].tolist()))
                    == sorted(zip(pml[k].tolist(), pml[k + 1].tolist())))
    else:
        for a, b in zip(ours, pml):
            assert torch.equal(a, b.long())


def check(name, dist, x, y, *ref, entries):
    ours, pml = build(name, dist, entries)
    assert_same(ours(x, y, *ref), ours.reference(x, y, *ref), pml(x, y, *ref),
                name.startswith("ms"))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dist", list(DISTS))
@pytest.mark.parametrize("name", list(MINERS))
def test_streaming_equals_dense_and_pml(case, dist, name):
    x, y = make_case(case)
    x = x.detach()
    # blocks of 3 rows: boundaries inside every case but b1 (and a short last block)
    check(name, dist, x, y, entries=3 * len(x))


@pytest.mark.parametrize("dist", ["default", "cos", "lp_sq"])
@pytest.mark.parametrize("name", list(MINERS))
@pytest.mark.parametrize("refs", ["other_labels", "batch_labels", "batch_itself"])
def test_ref_emb(refs, dist, name):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(23, 6, dtype=torch.float64, generator=g)
    y = torch.randint(0, 4, (23,), generator=g)
    if refs == "other_labels":
        r, ry = torch.randn(31, 6, dtype=torch.float64, generator=g), torch.randint(0, 5, (31,),
                                                                                   generator=g)
    elif refs == "batch_labels":  # another tensor, the batch's labels: PML's identity quirks
        r, ry = x.clone(), y
    else:
        r, ry = x, y.clone()
    check(name, dist, x, y, r, ry, entries=4 * len(r))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(MINERS))
def test_low_precision_equals_dense(dtype, name):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(40, 8, generator=g).to(dtype)
    y = torch.randint(0, 5, (40,), generator=g)
    for dist in ("default", "cos"):
        ours, _ = build(name, dist, entries=7 * 40)
        for a, b in zip(ours(x, y), ours.reference(x, y)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", list(MINERS))
def test_no_full_matrix(name, monkeypatch):
    """The distance's full call raises; every block it computes has fewer rows than B."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(150, 10, dtype=torch.float64, generator=g)
    y = torch.randint(0, 12, (150,), generator=g)
    for dist in ("default", "cos"):
        ours, pml = build(name, dist, entries=10 * 150)
        expected = ours.reference(x, y)
        rows = []
        for cls in (mo.distances.LpDistance, mo.distances.CosineSimilarity):
            orig = cls.compute_mat
            monkeypatch.setattr(cls, "compute_mat", lambda self, q, r, orig=orig:
                                rows.append(len(q)) or orig(self, q, r))
        cdist = torch.cdist
        monkeypatch.setattr(torch, "cdist",
                            lambda q, r, **k: rows.append(len(q)) or cdist(q, r, **k))
        monkeypatch.setattr(BaseDistance, "__call__", lambda *a: pytest.fail("full B×M matrix"))
        got = ours(x, y)
        monkeypatch.undo()
        assert rows and max(rows) == 10
        for a, b in zip(got, expected):
            assert torch.equal(a, b)


def test_empty_outputs():
    x = torch.randn(5, 3, dtype=torch.float64)
    for y in (torch.arange(5), torch.zeros(5, dtype=torch.long)):
        for name in MINERS:
            ours, pml = build(name, "default", entries=2 * 5)
            out = ours(x, y)
            assert all(len(t) == 0 and t.dtype == torch.long for t in out)
            assert [len(t) for t in pml(x, y)] == [0] * len(out)
