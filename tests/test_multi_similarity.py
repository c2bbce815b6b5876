"""MultiSimilarityLoss (reference backend) against PML 2.9: value and gradient, float64
rtol 1e-6, plus the log-sum-exp stability that β=50 needs in low precision."""
import pytest
import torch
from pytorch_metric_learning import distances as pd
from pytorch_metric_learning import miners as pm

import metrix_ops as mo
from cases import CASE_IDS, CASES, assert_close_vg, make_case, pml_pair

HYPER = [{}, {"alpha": 1.3, "beta": 20.0, "base": 0.3}, {"alpha": 4.0, "beta": 80.0, "base": 0.7}]
DISTANCES = {"cosine": None, "lp": pd.LpDistance, "lp_sq_raw": lambda: pd.LpDistance(
    normalize_embeddings=False, power=2)}


def pair(kw=None, dist=None, reducer=None):
    return pml_pair("MultiSimilarityLoss", kw, dist, reducer)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dist", list(DISTANCES), ids=list(DISTANCES))
def test_cases_match_pml(case, dist):
    x, y = make_case(case)
    for kw in HYPER:
        ours, pml = pair(kw, DISTANCES[dist])
        assert_close_vg(lambda e: ours(e, y), lambda e: pml(e, y), x)


@pytest.mark.parametrize("reducer", ["SumReducer", "AvgNonZeroReducer"])
def test_other_reducers_match_pml(reducer):
    x, y = make_case(CASES[1], seed=4)
    ours, pml = pair({"beta": 30.0}, reducer=reducer)
    assert_close_vg(lambda e: ours(e, y), lambda e: pml(e, y), x)


def test_indices_tuple_from_pml_miners():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(21, 8, dtype=torch.float64, generator=g)
    y = torch.randint(0, 5, (21,), generator=g)
    miners = [pm.MultiSimilarityMiner(), pm.MultiSimilarityMiner(epsilon=0.4),
              pm.TripletMarginMiner(margin=0.3),  # a triplet tuple: converted to pairs
              pm.BatchHardMiner(), pm.PairMarginMiner(pos_margin=0.2, neg_margin=0.8)]
    for miner in miners:
        it = miner(x, y)
        for kw in HYPER[:2]:
            ours, pml = pair(kw)
            assert_close_vg(lambda e: ours(e, y, it), lambda e: pml(e, y, it), x)


def test_our_miner_gives_pml_loss():
    x, y = make_case(CASES[1], seed=2)
    ours, pml = pair()
    ours_it = mo.miners.MultiSimilarityMiner()(x, y)
    pml_it = pm.MultiSimilarityMiner()(x, y)
    assert sum(len(t) for t in ours_it) > 0
    assert_close_vg(lambda e: ours(e, y, ours_it), lambda e: pml(e, y, pml_it), x)


@pytest.mark.parametrize("dist", ["cosine", "lp"])
def test_ref_emb_matches_pml(dist):
    g = torch.Generator().manual_seed(12)
    x = torch.randn(13, 6, dtype=torch.float64, generator=g)
    r = torch.randn(21, 6, dtype=torch.float64, generator=g)
    y, ry = torch.randint(0, 4, (13,), generator=g), torch.randint(0, 4, (21,), generator=g)
    ours, pml = pair(HYPER[1], DISTANCES[dist])
    assert_close_vg(lambda e, f: ours(e, y, ref_emb=f, ref_labels=ry),
                    lambda e, f: pml(e, y, ref_emb=f, ref_labels=ry), x, r)
    # ref_labels *is* labels: PML then also drops the diagonal (a, a) from the positives
    assert_close_vg(lambda e, f: ours(e, y, ref_emb=f, ref_labels=y),
                    lambda e, f: pml(e, y, ref_emb=f, ref_labels=y), x, r[:13])


def test_functional_equals_module():
    x, y = make_case(CASES[0])
    kw = {"alpha": 1.5, "beta": 40.0, "base": 0.4}
    a = mo.functional.multi_similarity_loss(x, y, backend="reference", **kw)
    b = mo.losses.MultiSimilarityLoss(backend="reference", **kw)(x, y)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert mo.losses.MultiSimilarityLoss(1.5, 40.0, 0.4).loss_params() == kw  # PML's order


@pytest.mark.parametrize("dist", ["cosine", "lp"])
def test_gradcheck(dist):
    x, y = make_case(CASES[2])
    ours, _ = pair({"beta": 10.0}, DISTANCES[dist])
    assert torch.autograd.gradcheck(lambda e: ours(e, y), (x.detach().requires_grad_(),))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_finite_and_close(dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(24, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (24,), generator=g)
    ours, _ = pair()
    ref = ours(x, y)
    xl = x.to(dtype).requires_grad_(True)
    out = ours(xl, y)
    out.backward()
    assert out.dtype == torch.float32  # half inputs are computed and returned in fp32
    assert torch.isfinite(out) and torch.isfinite(xl.grad).all()
    tol = {torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    assert abs(float(out.detach()) - float(ref)) <= tol * max(1.0, abs(float(ref)))


def near_duplicate_classes(dtype, seed=4):
    """Two classes whose members are all within ~1e-3: every negative has s ≈ 1."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.randn(1, 32, generator=g, dtype=torch.float64)
    x = centre + 1e-3 * torch.randn(16, 32, generator=g, dtype=torch.float64)
    # round to the test dtype first: the float64 oracle sees exactly the same inputs
    return x.to(dtype), torch.tensor([0] * 8 + [1] * 8)


# (input dtype, β, dtype a naive Σe^{β(s−base)} overflows in, or None)
OVERFLOW = [(torch.float16, 50.0, torch.float16),  # e^25 > 65504
            (torch.bfloat16, 50.0, None), (torch.float32, 50.0, None),
            (torch.float32, 200.0, torch.float32)]  # e^100 > 3.4e38


@pytest.mark.parametrize("dtype,beta,naive_overflows", OVERFLOW,
                         ids=[f"{str(d)[6:]}-beta{b:g}" for d, b, _ in OVERFLOW])
def test_large_exponents_are_stable(dtype, beta, naive_overflows):
    x, y = near_duplicate_classes(dtype)
    if naive_overflows is not None:  # the test is meaningful: the naive form does overflow
        u = torch.nn.functional.normalize(x.to(naive_overflows), dim=1)
        assert not torch.isfinite(torch.exp(beta * (u @ u.T - 0.5)).sum(1)).all()
    ours, pml = pair({"beta": beta})
    x64 = x.double().requires_grad_(True)
    ref_v = ours(x64, y)
    (ref_g,) = torch.autograd.grad(ref_v, x64)
    torch.testing.assert_close(ref_v, pml(x64, y), rtol=1e-9, atol=0)
    xl = x.detach().requires_grad_(True)
    out = ours(xl, y)
    (grad,) = torch.autograd.grad(out, xl)
    assert torch.isfinite(out) and torch.isfinite(grad).all()
    # fp32 compute of the same (rounded) inputs: the value agrees to fp32 accuracy
    torch.testing.assert_close(out.double(), ref_v.detach(), rtol=2e-6, atol=0)
    # the gradient comes back in the input dtype (its rounding, and fp16's subnormal step
    # for these ~1e-5 entries), and near-duplicates cancel in fp32: compared at that scale
    fi = torch.finfo(dtype)
    torch.testing.assert_close(grad.double(), ref_g, rtol=2 * fi.eps,
                               atol=1e-3 * ref_g.abs().max() + fi.smallest_normal * fi.eps)
