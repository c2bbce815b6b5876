"""CircleLoss (reference backend) against PML 2.9: value and gradient, float64 rtol 1e-6.

CircleLoss's weights [O_p − s]₊, [s − O_n]₊ are detached by definition, so its gradient is
not the derivative of its value and gradcheck does not apply; the gradient is checked
against PML's instead, and against a hand-built surrogate with the weights frozen."""
import pytest
import torch
from pytorch_metric_learning import distances as pd
from pytorch_metric_learning import losses as pl
from pytorch_metric_learning import miners as pm

import metrix_ops as mo
from cases import CASE_IDS, CASES, assert_close_vg, make_case, pml_pair

HYPER = [{}, {"m": 0.25, "gamma": 64.0}, {"m": 0.25, "gamma": 256.0}]


def pair(kw=None, reducer=None):
    return pml_pair("CircleLoss", kw, reducer=reducer)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cases_match_pml(case):
    x, y = make_case(case)
    for kw in HYPER:
        ours, pml = pair(kw)
        assert_close_vg(lambda e: ours(e, y), lambda e: pml(e, y), x)


def test_other_reducers_match_pml():
    x, y = make_case(CASES[1], seed=4)
    for red in ("MeanReducer", "SumReducer"):
        ours, pml = pair(HYPER[1], reducer=red)
        assert_close_vg(lambda e: ours(e, y), lambda e: pml(e, y), x)


def test_other_distances_are_refused_like_pml():
    x, y = make_case(CASES[0])
    for dist in (pd.LpDistance, pd.DotProductSimilarity):
        with pytest.raises(AssertionError):
            pl.CircleLoss(distance=dist())
        with pytest.raises(ValueError, match="CosineSimilarity"):
            mo.losses.CircleLoss(distance=dist(), backend="reference")(x, y)


def test_indices_tuple_from_pml_miners():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(21, 8, dtype=torch.float64, generator=g)
    y = torch.randint(0, 5, (21,), generator=g)
    for miner in (pm.MultiSimilarityMiner(), pm.TripletMarginMiner(margin=0.3),
                  pm.BatchHardMiner(), pm.PairMarginMiner(pos_margin=0.2, neg_margin=0.8)):
        it = miner(x, y)
        for kw in HYPER[:2]:
            ours, pml = pair(kw)
            assert_close_vg(lambda e: ours(e, y, it), lambda e: pml(e, y, it), x)


def test_ref_emb_matches_pml():
    g = torch.Generator().manual_seed(12)
    x = torch.randn(13, 6, dtype=torch.float64, generator=g)
    r = torch.randn(21, 6, dtype=torch.float64, generator=g)
    y, ry = torch.randint(0, 4, (13,), generator=g), torch.randint(0, 4, (21,), generator=g)
    for kw in HYPER[:2]:
        ours, pml = pair(kw)
        assert_close_vg(lambda e, f: ours(e, y, ref_emb=f, ref_labels=ry),
                        lambda e, f: pml(e, y, ref_emb=f, ref_labels=ry), x, r)
        assert_close_vg(lambda e, f: ours(e, y, ref_emb=f, ref_labels=y),
                        lambda e, f: pml(e, y, ref_emb=f, ref_labels=y), x, r[:13])


def circle_with_frozen_weights(x, y, x_weights, m, gamma):
    """The per-anchor circle loss with the weights taken from x_weights (a constant), mean
    over anchors having both a positive and a negative: its derivative is the loss's."""
    s = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(x, dim=1).T
    with torch.no_grad():
        sw = torch.nn.functional.normalize(x_weights, dim=1) @ torch.nn.functional.normalize(
            x_weights, dim=1).T
    pos = (y[:, None] == y[None, :]) & ~torch.eye(len(y), dtype=torch.bool)
    neg = y[:, None] != y[None, :]
    total, count = 0.0, 0
    for i in range(len(y)):
        if not pos[i].any() or not neg[i].any():
            continue
        lp = -gamma * (1 + m - sw[i, pos[i]]).clamp(min=0) * (s[i, pos[i]] - (1 - m))
        ln = gamma * (sw[i, neg[i]] + m).clamp(min=0) * (s[i, neg[i]] - m)
        total = total + torch.nn.functional.softplus(torch.logsumexp(lp, 0) + torch.logsumexp(ln, 0))
        count += 1
    return total / count


def test_gradient_is_that_of_the_frozen_weight_surrogate():
    x, y = make_case(CASES[0])
    x = x.detach()
    kw = {"m": 0.3, "gamma": 20.0}
    ours = mo.losses.CircleLoss(backend="reference", **kw)
    # every loss is positive here, so AvgNonZero is the mean over the valid anchors
    assert_close_vg(lambda e: ours(e, y), lambda e: circle_with_frozen_weights(e, y, x, **kw), x)
    # and the frozen surrogate is a proper function: gradcheck it (the weights stay fixed)
    assert torch.autograd.gradcheck(lambda e: circle_with_frozen_weights(e, y, x, **kw),
                                    (x.clone().requires_grad_(),))


def test_functional_equals_module():
    x, y = make_case(CASES[0])
    a = mo.functional.circle_loss(x, y, m=0.3, gamma=100.0, backend="reference")
    b = mo.losses.CircleLoss(0.3, 100.0, backend="reference")(x, y)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_finite_and_close(dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(24, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (24,), generator=g)
    ours, _ = pair({"m": 0.25, "gamma": 256.0})  # γ=256: logits far past fp16's exp range
    ref = ours(x, y)
    xl = x.to(dtype).requires_grad_(True)
    out = ours(xl, y)
    out.backward()
    assert out.dtype == torch.float32
    assert torch.isfinite(out) and torch.isfinite(xl.grad).all() and xl.grad.abs().sum() > 0
    tol = {torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    assert abs(float(out.detach()) - float(ref)) <= tol * max(1.0, abs(float(ref)))
