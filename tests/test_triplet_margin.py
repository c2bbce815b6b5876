"""TripletMarginLoss against PML 2.9: value and gradients (float64, rtol 1e-6) on every
case, margins / swap / smooth_loss, distances, reducers, PML miners' tuples, labels=None
with a tuple, ref_emb/ref_labels; random triplets_per_anchor (valid, uniform, and the loss
is PML's loss over exactly the sampled triplets)."""
import pytest
import torch
from pytorch_metric_learning import distances as pd
from pytorch_metric_learning import losses as pl
from pytorch_metric_learning import miners as pm
from pytorch_metric_learning import reducers as pr

import metrix_ops as mo
from cases import CASE_IDS, CASES, assert_close_vg, make_case
from metrix_ops.reference.pairs import match_masks
from metrix_ops.reference.triplet_margin import random_triplets

KWS = [{}, {"margin": 0.3, "swap": True}, {"margin": 0.2, "smooth_loss": True},
       {"margin": 0.1, "swap": True, "smooth_loss": True}]
KW_IDS = ["default", "swap", "smooth", "swap_smooth"]


def ours(**kw):
    return mo.losses.TripletMarginLoss(backend="reference", **kw)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("kw", KWS, ids=KW_IDS)
def test_matches_pml(case, kw):
    x, y = make_case(case)
    a, b = ours(**kw), pl.TripletMarginLoss(**kw)
    assert_close_vg(lambda e: a(e, y), lambda e: b(e, y), x)


@pytest.mark.parametrize("dist", [lambda: pd.CosineSimilarity(), lambda: pd.LpDistance(power=2),
                                  lambda: pd.LpDistance(normalize_embeddings=False),
                                  lambda: pd.DotProductSimilarity(normalize_embeddings=False)],
                         ids=["cos", "lp_sq", "lp_raw", "dot_raw"])
def test_other_distances_match_pml(dist):
    for case in CASES[:3] + CASES[6:]:
        x, y = make_case(case, seed=1)
        for kw in ({"margin": 0.2}, {"margin": 0.1, "swap": True}):
            a, b = ours(distance=dist(), **kw), pl.TripletMarginLoss(distance=dist(), **kw)
            assert_close_vg(lambda e: a(e, y), lambda e: b(e, y), x)


def test_other_reducers_match_pml():
    x, y = make_case(CASES[1])
    for red in ("MeanReducer", "SumReducer", "AvgNonZeroReducer"):
        a = ours(margin=0.2, reducer=getattr(pr, red)())
        b = pl.TripletMarginLoss(margin=0.2, reducer=getattr(pr, red)())
        assert_close_vg(lambda e: a(e, y), lambda e: b(e, y), x)


def _batch(seed=11, b=19, d=8, k=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, d, dtype=torch.float64, generator=g).requires_grad_(True),
            torch.randint(0, k, (b,), generator=g))


def test_indices_tuple_from_pml_miners():
    x, y = _batch()
    miners = [pm.MultiSimilarityMiner(), pm.TripletMarginMiner(margin=0.3), pm.BatchHardMiner(),
              pm.TripletMarginMiner(margin=0.0, type_of_triplets="hard"),
              pm.TripletMarginMiner(margin=0.1, type_of_triplets="semihard",
                                    distance=pd.CosineSimilarity())]
    for kw in KWS[:3]:
        a, b = ours(**kw), pl.TripletMarginLoss(**kw)
        for miner in miners:
            it = miner(x.detach(), y)
            assert_close_vg(lambda e: a(e, y, it), lambda e: b(e, y, it), x)
            # as PML, labels are not needed once the triplets are given
            assert_close_vg(lambda e: a(e, None, it), lambda e: b(e, None, it), x)
        empty = tuple(torch.empty(0, dtype=torch.long) for _ in range(3))
        assert_close_vg(lambda e: a(e, y, empty), lambda e: b(e, y, empty), x)


def test_ref_emb_matches_pml():
    g = torch.Generator().manual_seed(12)
    x = torch.randn(13, 6, dtype=torch.float64, generator=g)
    r = torch.randn(21, 6, dtype=torch.float64, generator=g)
    y, ry = torch.randint(0, 4, (13,), generator=g), torch.randint(0, 4, (21,), generator=g)
    for kw in ({}, {"margin": 0.2, "smooth_loss": True}):
        a, b = ours(**kw), pl.TripletMarginLoss(**kw)
        assert_close_vg(lambda e, f: a(e, y, ref_emb=f, ref_labels=ry),
                        lambda e, f: b(e, y, ref_emb=f, ref_labels=ry), x, r)
        # ref_labels *is* labels: PML then excludes the diagonal too
        assert_close_vg(lambda e, f: a(e, y, ref_emb=f, ref_labels=y),
                        lambda e, f: b(e, y, ref_emb=f, ref_labels=y), x, r[:13])
        it = pm.TripletMarginMiner(margin=0.4)(x, y, r, ry)
        assert_close_vg(lambda e, f: a(e, y, it, ref_emb=f, ref_labels=ry),
                        lambda e, f: b(e, y, it, ref_emb=f, ref_labels=ry), x, r)


def test_swap_with_ref_emb_uses_reference_distances():
    # deliberate deviation: PML reads d(p, n) from the query×reference matrix, which is
    # wrong with ref_emb; ours is d(r_p, r_n). Checked against a direct computation.
    g = torch.Generator().manual_seed(13)
    x = torch.randn(7, 5, dtype=torch.float64, generator=g)
    r = torch.randn(10, 5, dtype=torch.float64, generator=g)
    y, ry = torch.randint(0, 3, (7,), generator=g), torch.randint(0, 3, (10,), generator=g)
    pos, neg = match_masks(y, ry, False)
    a, p, n = torch.where(pos[:, :, None] & neg[:, None, :])
    xn, rn = torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(r, dim=1)
    d_ap = (xn[a] - rn[p]).norm(dim=1)
    d_an = torch.minimum((xn[a] - rn[n]).norm(dim=1), (rn[p] - rn[n]).norm(dim=1))
    t = torch.relu(d_ap - d_an + 0.3)
    expected = t[t > 0].mean()
    got = ours(margin=0.3, swap=True)(x, y, ref_emb=r, ref_labels=ry)
    torch.testing.assert_close(got, expected)


def test_random_triplets_are_valid_and_the_loss_is_pml_over_them():
    x, y = make_case(CASES[1])  # B=31, 6 classes
    for kw in ({"triplets_per_anchor": 3}, {"triplets_per_anchor": 5, "margin": 0.3, "swap": True}):
        k = kw["triplets_per_anchor"]
        torch.manual_seed(123)
        value = ours(**kw)(x, y)
        torch.manual_seed(123)  # the loss draws nothing but its triplets: replay them
        a, p, n = random_triplets(y, y, True, k)
        pos, neg = match_masks(y, y, True)
        assert (y[a] == y[p]).all() and (y[a] != y[n]).all() and (a != p).all()
        counts = torch.bincount(a, minlength=len(y))
        eligible = pos.any(1) & neg.any(1)
        assert (counts[eligible] == k).all() and (counts[~eligible] == 0).all()
        assert len(a) == k * int(eligible.sum())
        pml_kw = {key: v for key, v in kw.items() if key != "triplets_per_anchor"}
        b = pl.TripletMarginLoss(**pml_kw)
        torch.testing.assert_close(value, b(x, y, (a, p, n)), rtol=1e-6, atol=1e-9)
        torch.manual_seed(123)
        assert_close_vg(lambda e: (torch.manual_seed(123), ours(**kw)(e, y))[1],
                        lambda e: b(e, y, (a, p, n)), x)


def test_random_triplets_with_ref_emb_and_sampling_is_uniform():
    g = torch.Generator().manual_seed(14)
    y = torch.tensor([0, 0, 1, 2])
    ry = torch.tensor([0, 0, 0, 1, 2, 2, 1])
    torch.manual_seed(0)
    a, p, n = random_triplets(y, ry, False, 4000)
    # with ref_emb nothing is excluded: anchor 0's positives are ref 0, 1, 2
    assert (y[a] == ry[p]).all() and (y[a] != ry[n]).all()
    assert set(torch.bincount(a).tolist()) == {4000}
    for anchor in range(4):
        sel = a == anchor
        for idx, mask in ((p[sel], ry == y[anchor]), (n[sel], ry != y[anchor])):
            freq = torch.bincount(idx, minlength=len(ry))[mask].double() / 4000
            torch.testing.assert_close(freq, torch.full_like(freq, 1 / int(mask.sum())), atol=0.04, rtol=0)
    x = torch.randn(4, 3, dtype=torch.float64, generator=g)
    r = torch.randn(7, 3, dtype=torch.float64, generator=g)
    torch.manual_seed(1)
    value = ours(triplets_per_anchor=2)(x, y, ref_emb=r, ref_labels=ry)
    torch.manual_seed(1)
    it = random_triplets(y, ry, False, 2)
    torch.testing.assert_close(value, pl.TripletMarginLoss()(x, y, it, ref_emb=r, ref_labels=ry))


def test_triplets_per_anchor_edge_cases():
    x, y = make_case(CASES[0])
    it = pm.TripletMarginMiner(margin=0.5)(x.detach(), y)
    # an indices_tuple wins over triplets_per_anchor, as in PML
    torch.testing.assert_close(ours(triplets_per_anchor=2)(x, y, it), pl.TripletMarginLoss()(x, y, it))
    # 0 per anchor: no triplets, a zero loss that still reaches the embeddings (PML too)
    zero = ours(triplets_per_anchor=0)(x, y)
    assert float(zero.detach()) == 0 == float(pl.TripletMarginLoss(triplets_per_anchor=0)(x, y).detach())
    assert zero.requires_grad
    # an anchor class with a single member has no positive and is never sampled
    out = ours(triplets_per_anchor=4)(x[:2], torch.tensor([0, 1]))
    assert float(out.detach()) == 0
    for bad in ("some", -1, 2.5, True):
        with pytest.raises(ValueError, match="triplets_per_anchor"):
            ours(triplets_per_anchor=bad)
        with pytest.raises(ValueError, match="triplets_per_anchor"):
            mo.functional.triplet_margin_loss(x, y, triplets_per_anchor=bad, backend="reference")


def test_functional_equals_module_and_gradcheck():
    x, y = make_case(CASES[2])  # B=5, D=3
    x = (x + 0.01 * torch.arange(15, dtype=torch.float64).reshape(5, 3)).detach()  # off kinks
    for kw in ({"margin": 0.4}, {"margin": 0.2, "smooth_loss": True, "swap": True}):
        f = lambda e: mo.functional.triplet_margin_loss(e, y, backend="reference", **kw)
        torch.testing.assert_close(f(x), ours(**kw)(x, y))
        assert torch.autograd.gradcheck(f, (x.clone().requires_grad_(),))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype):
    x, y = _batch(3, 24, 16, 5)
    x = x.detach()
    loss = ours(margin=0.2)
    ref = loss(x, y)
    xl = x.to(dtype).requires_grad_(True)
    out = loss(xl, y)
    out.backward()
    assert out.dtype == torch.float32 and torch.isfinite(out) and torch.isfinite(xl.grad).all()
    assert xl.grad.dtype == dtype
    tol = {torch.float16: 2e-2, torch.bfloat16: 8e-2}[dtype]
    assert abs(float(out.detach()) - float(ref)) <= tol * max(1.0, abs(float(ref)))
