"""LiftedStructureLoss and GeneralizedLiftedStructureLoss (reference backend) against
PML 2.9: value and gradient, float64 rtol 1e-6."""
import pytest
import torch
from pytorch_metric_learning import distances as pd
from pytorch_metric_learning import miners as pm

import metrix_ops as mo
from cases import CASE_IDS, CASES, assert_close_vg, make_case
from cases import pml_pair as pair

NAMES = ["LiftedStructureLoss", "GeneralizedLiftedStructureLoss"]
HYPER = [{}, {"neg_margin": 0.6, "pos_margin": 0.1}, {"neg_margin": 2.5, "pos_margin": 0.4}]
DISTANCES = {"lp": None, "cosine": pd.CosineSimilarity,
             "lp_sq_raw": lambda: pd.LpDistance(normalize_embeddings=False, power=2)}



@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dist", list(DISTANCES))
@pytest.mark.parametrize("name", NAMES)
def test_cases_match_pml(name, dist, case):
    x, y = make_case(case)
    for kw in HYPER[:2]:  # HYPER[2] (large margins) runs in the reducer test
        ours, pml = pair(name, kw, DISTANCES[dist])
        assert_close_vg(lambda e: ours(e, y), lambda e: pml(e, y), x)


@pytest.mark.parametrize("name", NAMES)
def test_other_reducers_match_pml(name):
    x, y = make_case(CASES[1], seed=4)
    for red in ("MeanReducer", "SumReducer", "AvgNonZeroReducer"):
        ours, pml = pair(name, HYPER[2], reducer=red)
        assert_close_vg(lambda e: ours(e, y), lambda e: pml(e, y), x)


@pytest.mark.parametrize("name", NAMES)
def test_indices_tuple_from_pml_miners(name):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(21, 8, dtype=torch.float64, generator=g)
    y = torch.randint(0, 5, (21,), generator=g)
    miners = [pm.MultiSimilarityMiner(), pm.TripletMarginMiner(margin=0.3), pm.BatchHardMiner(),
              pm.PairMarginMiner(pos_margin=0.2, neg_margin=0.8)]
    for miner in miners:
        it = miner(x, y)
        for kw in HYPER[:2]:
            ours, pml = pair(name, kw)
            assert_close_vg(lambda e: ours(e, y, it), lambda e: pml(e, y, it), x)


def test_lifted_positive_pair_without_negatives():
    # a mined tuple where the positive pair (0, 1) shares no anchor with any negative:
    # PML's empty log-sum-exp is 0, leaving [d(a,p) − m_pos]₊² / 2
    x, y = make_case(CASES[0])
    it = (torch.tensor([0, 2]), torch.tensor([1, 5]), torch.tensor([2, 2]), torch.tensor([3, 4]))
    y = y.clone()
    y[[0, 1]], y[[2, 5]], y[[3, 4]] = 0, 1, 2
    ours, pml = pair("LiftedStructureLoss", {"pos_margin": 0.05})
    assert_close_vg(lambda e: ours(e, y, it), lambda e: pml(e, y, it), x)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dist", ["lp", "cosine"])
def test_ref_emb_matches_pml(name, dist):
    # LiftedStructureLoss quirk covered here: PML matches negatives to a positive pair by
    # comparing the anchor index a2 with p, a *reference* index when ref_emb is given
    g = torch.Generator().manual_seed(12)
    x = torch.randn(13, 6, dtype=torch.float64, generator=g)
    r = torch.randn(21, 6, dtype=torch.float64, generator=g)
    y, ry = torch.randint(0, 4, (13,), generator=g), torch.randint(0, 4, (21,), generator=g)
    ours, pml = pair(name, HYPER[1], DISTANCES[dist])
    assert_close_vg(lambda e, f: ours(e, y, ref_emb=f, ref_labels=ry),
                    lambda e, f: pml(e, y, ref_emb=f, ref_labels=ry), x, r)
    assert_close_vg(lambda e, f: ours(e, y, ref_emb=f, ref_labels=y),
                    lambda e, f: pml(e, y, ref_emb=f, ref_labels=y), x, r[:13])


def test_functional_equals_module():
    x, y = make_case(CASES[0])
    kw = {"neg_margin": 0.7, "pos_margin": 0.2}
    for fn, name in (("lifted_structure_loss", "LiftedStructureLoss"),
                     ("generalized_lifted_structure_loss", "GeneralizedLiftedStructureLoss")):
        a = getattr(mo.functional, fn)(x, y, backend="reference", **kw)
        b = getattr(mo.losses, name)(backend="reference", **kw)(x, y)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert getattr(mo.losses, name)(0.7, 0.2).loss_params() == kw  # PML's order


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dist", ["lp", "cosine"])
def test_gradcheck(name, dist):
    x, y = make_case(CASES[2])
    x = x + 0.01 * torch.arange(15, dtype=torch.float64).reshape(5, 3)  # away from relu kinks
    ours, _ = pair(name, {"neg_margin": 1.5}, DISTANCES[dist])
    assert torch.autograd.gradcheck(lambda e: ours(e, y), (x.detach().requires_grad_(),))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_finite_and_close(name, dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(24, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (24,), generator=g)
    ours, _ = pair(name)
    ref = ours(x, y)
    xl = x.to(dtype).requires_grad_(True)
    out = ours(xl, y)
    out.backward()
    assert out.dtype == torch.float32
    assert torch.isfinite(out) and torch.isfinite(xl.grad).all() and xl.grad.abs().sum() > 0
    tol = {torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    assert abs(float(out.detach()) - float(ref)) <= tol * max(1.0, abs(float(ref)))
