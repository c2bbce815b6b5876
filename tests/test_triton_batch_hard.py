"""TripletMarginLoss(miner=BatchHardMiner) on the Triton engine (triton/batch_hard.py: the
HPHN mining kernel's picks, then the loss on the B triplets) against PML's two calls
`loss(x, y, miner(x, y))`: values and gradients over the shared cases, the loss's and the
miner's distances (L2 of normalised rows, cosine) in every combination, ref_emb, reducers,
smooth_loss, fp32 and half inputs, the no-triplet zero; the miner distances it leaves to
the index tuple.

Without a GPU these run under TRITON_INTERPRET=1 on CPU tensors."""
import pytest
import torch
from pytorch_metric_learning import distances as pd
from pytorch_metric_learning import losses as pl
from pytorch_metric_learning import miners as pm
from pytorch_metric_learning import reducers as pr

import metrix_ops as mo
from cases import CASE_IDS, CASES, assert_close_vg, make_case
from metrix_ops import fused
from triton_cases import on_dev, requires_triton

pytestmark = requires_triton

KEY = ("triton", "TripletMarginLoss")


def dists(name):
    """(ours, PML's) distance kwargs of a distance name."""
    if name == "l2":
        return {}, {}
    return {"distance": mo.distances.CosineSimilarity()}, {"distance": pd.CosineSimilarity()}


def build(loss_dist="l2", miner_dist="l2", reducer=None, **kw):
    (lo, lp), (mo_, mp) = dists(loss_dist), dists(miner_dist)
    red = {} if reducer is None else {"reducer": getattr(mo.reducers, reducer)()}
    pred = {} if reducer is None else {"reducer": getattr(pr, reducer)()}
    ours = mo.losses.TripletMarginLoss(backend="triton", miner=mo.miners.BatchHardMiner(**mo_),
                                       **lo, **red, **kw)
    loss, miner = pl.TripletMarginLoss(**lp, **pred, **kw), pm.BatchHardMiner(**mp)
    return ours, (lambda e, y, *ref: loss(e, y, miner(e, y, *ref), *ref))


@pytest.fixture
def calls(monkeypatch):
    out = []
    supports, impl = fused.MINER_IMPLS[KEY]
    monkeypatch.setitem(fused.MINER_IMPLS, KEY, (supports, lambda *a: out.append(1) or impl(*a)))
    return out


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("loss_dist,miner_dist", [("l2", "l2"), ("cos", "cos"), ("cos", "l2"),
                                                  ("l2", "cos")])
def test_matches_pml(case, loss_dist, miner_dist, calls):
    x, y = on_dev(*make_case(case))
    ours, theirs = build(loss_dist, miner_dist, margin=0.3)
    assert_close_vg(lambda e: ours(e, y), lambda e: theirs(e, y), x)
    assert calls


@pytest.mark.parametrize("reducer", ["MeanReducer", "SumReducer", "AvgNonZeroReducer"])
def test_reducers_and_smooth_loss(reducer):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(50, 9, dtype=torch.float64, generator=g)
    y = torch.randint(0, 6, (50,), generator=g)
    x, y = on_dev(x, y)
    for smooth in (False, True):
        ours, theirs = build(reducer=reducer, smooth_loss=smooth)
        assert_close_vg(lambda e: ours(e, y), lambda e: theirs(e, y), x)


@pytest.mark.parametrize("same_labels", [False, True])
def test_ref_emb(same_labels, calls):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(19, 7, dtype=torch.float64, generator=g)
    y = torch.randint(0, 4, (19,), generator=g)
    if same_labels:  # PML drops the self pairs by index: ref the same length
        r, ry = torch.randn(19, 7, dtype=torch.float64, generator=g), y
    else:
        r = torch.randn(30, 7, dtype=torch.float64, generator=g)
        ry = torch.randint(0, 4, (30,), generator=g)
    x, r, y, ry = on_dev(x, r, y, ry)
    ry = y if same_labels else ry
    ours, theirs = build("cos", "l2")
    assert_close_vg(lambda e, f: ours(e, y, ref_emb=f, ref_labels=ry),
                    lambda e, f: theirs(e, y, f, ry), x, r)
    assert calls


def test_fp32_and_half_inputs():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(45, 20, generator=g)
    y = torch.randint(0, 6, (45,), generator=g)
    x, y = on_dev(x, y)
    ours, theirs = build(margin=0.2)
    assert_close_vg(lambda e: ours(e, y), lambda e: theirs(e, y), x, rtol=1e-4, atol=1e-6)
    h = x.detach().half().requires_grad_()
    v = ours(h, y)
    v.backward()
    assert v.dtype == torch.float32 and torch.isfinite(h.grad).all()
    torch.testing.assert_close(v, theirs(h.detach().float(), y), rtol=2e-3, atol=1e-3)


def test_no_triplet_gives_zero_with_graph():
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    (x,) = on_dev(x)
    y = on_dev(torch.arange(5))[0]  # no positives: no triplet
    ours, _ = build()
    v = ours(x, y)
    v.backward()
    assert float(v.detach()) == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


def test_other_miner_distances_are_not_covered(calls):
    """A miner on unnormalised L2 orders pairs otherwise than the cosine: not this path (an
    explicit backend says so; "auto" takes another engine)."""
    x, y = on_dev(*make_case(CASES[1]))
    miner = mo.miners.BatchHardMiner(distance=mo.distances.LpDistance(normalize_embeddings=False))
    with pytest.raises(NotImplementedError, match="does not cover"):
        mo.losses.TripletMarginLoss(backend="triton", miner=miner)(x, y)
    assert not calls
