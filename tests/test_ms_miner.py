"""metrix_ops.miners.MultiSimilarityMiner returns the pairs PML's MultiSimilarityMiner
returns, in PML's order (by row, then by value; tied values, which PML's unstable sort
leaves open, by column): compared as sets over the shared cases (duplicates among them), as
lists on tie-free batches."""
import pytest
import torch
from pytorch_metric_learning import distances as pd
from pytorch_metric_learning import losses as pl
from pytorch_metric_learning import miners as pm

import metrix_ops as mo
from cases import CASE_IDS, CASES, make_case

DISTANCES = {"cosine": None, "lp": pd.LpDistance,
             "lp_sq_raw": lambda: pd.LpDistance(normalize_embeddings=False, power=2),
             "dot_raw": lambda: pd.DotProductSimilarity(normalize_embeddings=False)}


def miners(eps, dist):
    kw = {"epsilon": eps} if dist is None else {"epsilon": eps, "distance": dist()}
    return mo.miners.MultiSimilarityMiner(**kw), pm.MultiSimilarityMiner(**kw)


def as_sets(t):
    a1, p, a2, n = (v.tolist() for v in t)
    return set(zip(a1, p)), set(zip(a2, n))


def assert_same_pairs(ours, pml):
    assert len(ours) == 4 and all(v.dtype == torch.long and not v.requires_grad for v in ours)
    assert [len(v) for v in ours] == [len(v) for v in pml]  # no duplicates either side
    assert as_sets(ours) == as_sets(pml)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dist", list(DISTANCES))
def test_cases_match_pml(case, dist):
    x, y = make_case(case)
    x = x.detach()
    for eps in (0.1, 0.0, 0.5):
        ours, pml = miners(eps, DISTANCES[dist])
        assert_same_pairs(ours(x, y), pml(x, y))


def test_mining_is_selective():
    # guard against a vacuous pass: on a spread-out batch the default ε keeps some of the
    # pairs but not all, and a large ε keeps them all
    x, y = make_case(CASES[1])
    pos = (y[:, None] == y[None, :]).sum().item() - len(y)
    neg = (y[:, None] != y[None, :]).sum().item()
    a1, _, a2, _ = mo.miners.MultiSimilarityMiner()(x, y)
    assert 0 < len(a1) < pos and 0 < len(a2) < neg
    a1, _, a2, _ = mo.miners.MultiSimilarityMiner(epsilon=10.0)(x, y)
    assert (len(a1), len(a2)) == (pos, neg)


@pytest.mark.parametrize("dist", ["cosine", "lp"])
def test_ref_emb_matches_pml(dist):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 4, generator=g, dtype=torch.float64)
    r = torch.randn(14, 4, generator=g, dtype=torch.float64)
    y, ry = torch.randint(0, 3, (9,), generator=g), torch.randint(0, 3, (14,), generator=g)
    for eps in (0.1, 0.4):
        ours, pml = miners(eps, DISTANCES[dist])
        assert_same_pairs(ours(x, y, r, ry), pml(x, y, r, ry))


@pytest.mark.parametrize("dist", ["cosine", "lp"])
def test_identity_quirks_match_pml(dist):
    # PML drops self pairs from the pair lists by *label* identity (ref_labels is labels)
    # but from the hardness search by *embedding* identity (ref_emb is embeddings). When
    # they disagree PML's result is odd; we return the same pairs.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=g)
    ours, pml = miners(0.1, DISTANCES[dist])
    # another tensor with the same rows, the labels themselves: (a, a) is searched as a
    # positive and as a negative, and comes back on both sides
    got = ours(x, y, x.clone(), y)
    assert_same_pairs(got, pml(x, y, x.clone(), y))
    if dist == "cosine":
        diag = {(i, i) for i in range(12)}
        assert diag <= as_sets(got)[0] and diag <= as_sets(got)[1]
    # the embeddings themselves, a copy of the labels: (a, a) is a positive pair but never
    # searched
    got = ours(x, y, x, y.clone())
    assert_same_pairs(got, pml(x, y, x, y.clone()))
    assert not any(a == b for a, b in as_sets(got)[0])


@pytest.mark.parametrize("labels", [torch.arange(6), torch.zeros(6, dtype=torch.long)],
                         ids=["no_positives", "no_negatives"])
def test_empty_when_a_side_has_no_pairs(labels):
    x = torch.randn(6, 3, dtype=torch.float64)
    got = mo.miners.MultiSimilarityMiner()(x, labels)
    assert_same_pairs(got, pm.MultiSimilarityMiner()(x, labels))
    assert all(len(v) == 0 for v in got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_low_precision_inputs_match_pml(dtype):
    # the miner works in the input dtype, as PML's does (no gradient flows through it)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(20, 8, generator=g).to(dtype)
    y = torch.randint(0, 4, (20,), generator=g)
    ours, pml = miners(0.1, None)
    assert_same_pairs(ours(x, y), pml(x, y))


def test_mined_pairs_feed_the_loss_like_pml():
    x, y = make_case(CASES[1], seed=1)
    it_ours = mo.miners.MultiSimilarityMiner(epsilon=0.2)(x, y)
    it_pml = pm.MultiSimilarityMiner(epsilon=0.2)(x, y)
    a = mo.losses.MultiSimilarityLoss(backend="reference")(x, y, it_ours)
    b = pl.MultiSimilarityLoss()(x, y, it_pml)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    assert a.requires_grad


@pytest.mark.parametrize("dist", list(DISTANCES))
@pytest.mark.parametrize("refs", [False, True])
def test_order_within_rows_is_pmls(dist, refs):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(37, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (37,), generator=g)
    args = (x, y) + ((torch.randn(23, 6, generator=g, dtype=torch.float64),
                      torch.randint(0, 5, (23,), generator=g)) if refs else ())
    for eps in (0.1, 0.5):
        ours, pml = miners(eps, DISTANCES[dist])
        ours.block_entries = 5 * 37  # several row blocks
        got, want = ours(*args), pml(*args)
        assert len(got[0]) > 10 and len(got[2]) > 10
        assert [t.tolist() for t in got] == [t.tolist() for t in want]
        assert [t.tolist() for t in ours.reference(*args)] == [t.tolist() for t in want]


def test_tied_values_come_by_column():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.1]],
                     dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0, 0])
    a1, p, a2, n = mo.miners.MultiSimilarityMiner(epsilon=1.0)(x, y)
    # row 0's negatives 1 and 2 are the same point: by column
    assert [c for a, c in zip(a2.tolist(), n.tolist()) if a == 0] == [1, 2]
    assert_same_pairs((a1, p, a2, n), pm.MultiSimilarityMiner(epsilon=1.0)(x, y))
