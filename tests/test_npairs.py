"""NPairsLoss against PML 2.9: the selected pairs are exactly PML's (np.unique
return_index on the anchors' labels), and value and gradients (float64, rtol 1e-6) match
on every case, with distances, reducers and PML miners' tuples; ref_emb is refused as PML."""
import pytest
import torch
from pytorch_metric_learning import distances as pd
from pytorch_metric_learning import losses as pl
from pytorch_metric_learning import miners as pm
from pytorch_metric_learning import reducers as pr
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

import metrix_ops as mo
from cases import CASE_IDS, CASES, assert_close_vg, make_case
from metrix_ops.reference.npairs import unique_label_pos_pairs

DISTS = [None, lambda: pd.CosineSimilarity(), lambda: pd.LpDistance(),
         lambda: pd.DotProductSimilarity(normalize_embeddings=False)]
DIST_IDS = ["default", "cos", "lp", "dot_raw"]


def build(dist=None, **kw):
    extra = {} if dist is None else {"distance": dist()}
    return (mo.losses.NPairsLoss(backend="reference", **extra, **kw), pl.NPairsLoss(**extra, **kw))


def _batch(seed=11, b=19, d=8, k=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, d, dtype=torch.float64, generator=g),
            torch.randint(0, k, (b,), generator=g))


def _miner_tuples(x, y):
    return [pm.MultiSimilarityMiner()(x, y), pm.TripletMarginMiner(margin=0.3)(x, y),
            pm.BatchHardMiner()(x, y), pm.MultiSimilarityMiner(epsilon=0.0)(x, y),
            tuple(torch.empty(0, dtype=torch.long) for _ in range(4))]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dist", DISTS, ids=DIST_IDS)
def test_matches_pml(case, dist):
    x, y = make_case(case)
    ours, pml = build(dist)
    assert_close_vg(lambda e: ours(e, y), lambda e: pml(e, y), x)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_pairs_are_pmls_exactly(case):
    x, y = make_case(case)
    got = unique_label_pos_pairs(None, y)
    want = lmu.convert_to_pos_pairs_with_unique_labels(None, y)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    if len(got[0]):  # one pair per label that has a positive, sorted by label
        assert (y[got[0]] == y[got[1]]).all() and (torch.diff(y[got[0]]) > 0).all()


def test_pairs_from_miner_tuples_are_pmls_exactly():
    x, y = _batch()
    # a shuffled tuple with repeats: "first" means first in the tuple's own order
    a, p, n = pm.TripletMarginMiner(margin=0.5)(x, y)
    perm = torch.randperm(len(a), generator=torch.Generator().manual_seed(0))
    tuples = _miner_tuples(x, y) + [(a[perm], p[perm], n[perm])]
    for it in tuples:
        got = unique_label_pos_pairs(it, y)
        want = lmu.convert_to_pos_pairs_with_unique_labels(it, y)
        assert all(torch.equal(u, v) for u, v in zip(got, want))


def test_indices_tuple_from_pml_miners():
    x, y = _batch()
    x.requires_grad_(True)
    for dist in DISTS[:3]:
        ours, pml = build(dist)
        for it in _miner_tuples(x.detach(), y):
            assert_close_vg(lambda e: ours(e, y, it), lambda e: pml(e, y, it), x)


def test_other_reducers_match_pml():
    x, y = make_case(CASES[1])
    for red in ("SumReducer", "AvgNonZeroReducer"):
        ours, pml = build(reducer=getattr(pr, red)())
        assert_close_vg(lambda e: ours(e, y), lambda e: pml(e, y), x)


def test_ref_emb_and_missing_labels_are_refused_like_pml():
    x, y = _batch()
    for mod in build():
        with pytest.raises(ValueError, match="ref_emb"):
            mod(x, y, ref_emb=x.clone(), ref_labels=y)
        with pytest.raises(ValueError, match="labels"):  # pairs are picked by label
            mod(x, None, pm.BatchHardMiner()(x, y))


def test_one_pair_or_none_gives_zero():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    for y in (torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 2, 3])):  # one pair / no pair
        out = mo.losses.NPairsLoss(backend="reference")(x, y)
        assert float(out.detach()) == 0 == float(pl.NPairsLoss()(x, y).detach())
        out.backward()
        assert torch.isfinite(x.grad).all()


def test_functional_equals_module_and_gradcheck():
    x, y = _batch(2, 9, 4, 3)
    f = lambda e: mo.functional.npairs_loss(e, y, backend="reference")
    torch.testing.assert_close(f(x), mo.losses.NPairsLoss(backend="reference")(x, y))
    assert torch.autograd.gradcheck(f, (x.clone().requires_grad_(),))
    g = lambda e: mo.functional.npairs_loss(e, y, distance=pd.LpDistance(), backend="reference")
    assert torch.autograd.gradcheck(g, (x.clone().requires_grad_(),))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype):
    x, y = _batch(3, 24, 16, 5)
    loss = mo.losses.NPairsLoss(backend="reference")
    ref = loss(x, y)
    xl = x.to(dtype).requires_grad_(True)
    out = loss(xl, y)
    out.backward()
    assert out.dtype == torch.float32 and torch.isfinite(out) and torch.isfinite(xl.grad).all()
    tol = {torch.float16: 2e-2, torch.bfloat16: 8e-2}[dtype]
    assert abs(float(out.detach()) - float(ref)) <= tol * max(1.0, abs(float(ref)))
