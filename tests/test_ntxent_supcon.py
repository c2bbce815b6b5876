"""NTXentLoss and SupConLoss (reference backend) against PML 2.9: value and gradient,
float64 rtol 1e-6."""
import pytest
import torch
from pytorch_metric_learning import distances as pd
from pytorch_metric_learning import miners as pm

import metrix_ops as mo
from cases import CASE_IDS, CASES, assert_close_vg, make_case
from cases import pml_pair as pair

NAMES = ["NTXentLoss", "SupConLoss"]
HYPER = {"NTXentLoss": [{}, {"temperature": 0.5}], "SupConLoss": [{}, {"temperature": 0.03}]}
DISTANCES = {"cosine": None, "lp": pd.LpDistance,
             "dot_raw": lambda: pd.DotProductSimilarity(normalize_embeddings=False)}



@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dist", list(DISTANCES))
@pytest.mark.parametrize("name", NAMES)
def test_cases_match_pml(name, dist, case):
    x, y = make_case(case)
    if dist == "dot_raw":
        x = (0.3 * x).detach()  # raw dot products over τ: keep the logits moderate
    for kw in HYPER[name]:
        ours, pml = pair(name, kw, DISTANCES[dist])
        assert_close_vg(lambda e: ours(e, y), lambda e: pml(e, y), x)


@pytest.mark.parametrize("name", NAMES)
def test_other_reducers_match_pml(name):
    x, y = make_case(CASES[1], seed=4)
    for red in ("SumReducer", "AvgNonZeroReducer", "MeanReducer"):
        ours, pml = pair(name, HYPER[name][1], reducer=red)
        assert_close_vg(lambda e: ours(e, y), lambda e: pml(e, y), x)


def test_simclr_two_views_match_pml():
    # the usual NT-Xent call: two augmented views, the label is the source image
    g = torch.Generator().manual_seed(9)
    v1 = torch.randn(8, 12, dtype=torch.float64, generator=g)
    v2 = v1 + 0.3 * torch.randn(8, 12, dtype=torch.float64, generator=g)
    x, y = torch.cat([v1, v2]), torch.arange(8).repeat(2)
    for name in NAMES:
        ours, pml = pair(name)
        assert_close_vg(lambda e: ours(e, y), lambda e: pml(e, y), x)


@pytest.mark.parametrize("name", NAMES)
def test_indices_tuple_from_pml_miners(name):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(21, 8, dtype=torch.float64, generator=g)
    y = torch.randint(0, 5, (21,), generator=g)
    for miner in (pm.MultiSimilarityMiner(), pm.TripletMarginMiner(margin=0.3),
                  pm.BatchHardMiner(), pm.PairMarginMiner(pos_margin=0.2, neg_margin=0.8)):
        it = miner(x, y)
        for kw in HYPER[name]:
            ours, pml = pair(name, kw)
            assert_close_vg(lambda e: ours(e, y, it), lambda e: pml(e, y, it), x)


def test_ntxent_anchor_without_negatives():
    # positive pairs whose anchor has no negative: −log(1 + tiny) ≈ 0, yet they count in
    # the mean over positive pairs (PML's pos_pair reduction)
    x, y = make_case(CASES[0])
    it = (torch.tensor([0, 1, 2]), torch.tensor([1, 0, 3]), torch.tensor([2, 2]),
          torch.tensor([4, 5]))
    ours, pml = pair("NTXentLoss")
    assert_close_vg(lambda e: ours(e, y, it), lambda e: pml(e, y, it), x)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dist", ["cosine", "lp"])
def test_ref_emb_matches_pml(name, dist):
    g = torch.Generator().manual_seed(12)
    x = torch.randn(13, 6, dtype=torch.float64, generator=g)
    r = torch.randn(21, 6, dtype=torch.float64, generator=g)
    y, ry = torch.randint(0, 4, (13,), generator=g), torch.randint(0, 4, (21,), generator=g)
    ours, pml = pair(name, HYPER[name][1], DISTANCES[dist])
    assert_close_vg(lambda e, f: ours(e, y, ref_emb=f, ref_labels=ry),
                    lambda e, f: pml(e, y, ref_emb=f, ref_labels=ry), x, r)
    assert_close_vg(lambda e, f: ours(e, y, ref_emb=f, ref_labels=y),
                    lambda e, f: pml(e, y, ref_emb=f, ref_labels=y), x, r[:13])


def test_functional_equals_module():
    x, y = make_case(CASES[0])
    for fn, name in (("ntxent_loss", "NTXentLoss"), ("supcon_loss", "SupConLoss")):
        a = getattr(mo.functional, fn)(x, y, temperature=0.2, backend="reference")
        b = getattr(mo.losses, name)(0.2, backend="reference")(x, y)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dist", ["cosine", "lp"])
def test_gradcheck(name, dist):
    x, y = make_case(CASES[2])
    ours, _ = pair(name, {"temperature": 0.3}, DISTANCES[dist])
    assert torch.autograd.gradcheck(lambda e: ours(e, y), (x.detach().requires_grad_(),))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_finite_and_close(name, dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(24, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (24,), generator=g)
    ours, _ = pair(name, {"temperature": 0.01})  # logits up to 100: past fp16's exp range
    ref = ours(x, y)
    xl = x.to(dtype).requires_grad_(True)
    out = ours(xl, y)
    out.backward()
    assert out.dtype == torch.float32
    assert torch.isfinite(out) and torch.isfinite(xl.grad).all() and xl.grad.abs().sum() > 0
    # τ=0.01 amplifies the inputs' rounding 100-fold in the logits: a loose bound
    tol = {torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    assert abs(float(out.detach()) - float(ref)) <= tol * max(1.0, abs(float(ref)))
