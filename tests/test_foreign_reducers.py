"""PML's reducers that metrix_ops does not reimplement (DoNothingReducer, PerAnchorReducer,
ClassWeightedReducer, MultipleReducers, a subclass of PML's): called on the reference
backend's loss dict in PML's format, as a PML loss calls them. Against PML 2.9: values,
gradients and DoNothingReducer's dicts, with regularizers, inside CrossBatchMemory; an
explicit fused backend refuses; the Metrix term refuses a dict."""
import pytest
import torch
from pytorch_metric_learning import losses as pl
from pytorch_metric_learning import miners as pm
from pytorch_metric_learning import reducers as pr
from pytorch_metric_learning import regularizers as preg

import metrix_ops as mo
from cases import assert_close_vg


def _batch(b=15, d=5, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, d, generator=g, dtype=torch.float64),
            torch.randint(0, classes, (b,), generator=g))


class HalfMean(pr.MeanReducer):  # a user's subclass of a PML reducer
    def element_reduction(self, losses, *args):
        return 0.5 * torch.mean(losses)


REDUCERS = {
    "per_anchor": lambda: pr.PerAnchorReducer(),
    "per_anchor_sum": lambda: pr.PerAnchorReducer(reducer=pr.SumReducer()),
    "class_weighted": lambda: pr.ClassWeightedReducer(torch.tensor([1.0, 0.5, 2.0, 3.0])),
    "multiple": lambda: pr.MultipleReducers({"pos_loss": pr.SumReducer()},
                                            default_reducer=pr.MeanReducer()),
    "subclass": lambda: HalfMean(),
}
CASES = [("ContrastiveLoss", "per_anchor"), ("ContrastiveLoss", "per_anchor_sum"),
         ("NTXentLoss", "per_anchor"), ("ContrastiveLoss", "multiple"),
         ("MultiSimilarityLoss", "class_weighted"), ("TripletMarginLoss", "class_weighted"),
         ("ContrastiveLoss", "class_weighted"), ("MultiSimilarityLoss", "subclass"),
         ("CircleLoss", "subclass")]


@pytest.mark.parametrize("name,red", CASES, ids=[f"{n}-{r}" for n, r in CASES])
def test_reducer_matches_pml(name, red):
    x, y = _batch()
    ours = getattr(mo.losses, name)(reducer=REDUCERS[red]())
    theirs = getattr(pl, name)(reducer=REDUCERS[red]())
    assert_close_vg(lambda e: ours(e, y), lambda e: theirs(e, y), x)
    tup = pm.MultiSimilarityMiner()(x, y)  # with a miner's tuple too
    if name != "TripletMarginLoss":
        assert_close_vg(lambda e: ours(e, y, tup), lambda e: theirs(e, y, tup), x)


def _assert_same_dicts(a, b):
    assert list(a) == list(b)
    for k in a:
        assert a[k]["reduction_type"] == b[k]["reduction_type"]
        la, lb = a[k]["losses"], b[k]["losses"]
        torch.testing.assert_close(torch.as_tensor(la, dtype=torch.float64),
                                   torch.as_tensor(lb, dtype=torch.float64))
        ia, ib = a[k]["indices"], b[k]["indices"]
        if ia is None or ib is None:
            assert ia is None and ib is None
        else:
            for s, t in zip(ia if isinstance(ia, tuple) else (ia,),
                            ib if isinstance(ib, tuple) else (ib,)):
                assert torch.equal(s, t)


@pytest.mark.parametrize("name", ["ContrastiveLoss", "MultiSimilarityLoss", "TripletMarginLoss",
                                  "NTXentLoss", "GeneralizedLiftedStructureLoss"])
def test_do_nothing_reducer_gives_pml_dict(name):
    x, y = _batch()
    for ours_reg, pml_reg in ((None, None), (mo.regularizers.LpRegularizer(), preg.LpRegularizer())):
        ours = getattr(mo.losses, name)(reducer=pr.DoNothingReducer(), embedding_regularizer=ours_reg)
        theirs = getattr(pl, name)(reducer=pr.DoNothingReducer(), embedding_regularizer=pml_reg)
        _assert_same_dicts(ours(x, y), theirs(x, y))


def test_proxy_anchor_with_weight_regularizer_and_do_nothing_as_pml():
    x, y = _batch()
    theirs = pl.ProxyAnchorLoss(4, 5, reducer=pr.DoNothingReducer(),
                                weight_regularizer=preg.LpRegularizer()).double()
    ours = mo.losses.ProxyAnchorLoss(4, 5, reducer=pr.DoNothingReducer(),
                                     weight_regularizer=mo.regularizers.LpRegularizer()).double()
    with torch.no_grad():
        ours.proxies.copy_(theirs.proxies)
    _assert_same_dicts(ours(x, y), theirs(x, y))


def test_the_bank_with_a_pml_reducer_as_pml():
    # (PML's PerAnchorReducer cannot take a bank: its table is batch × batch)
    w = torch.tensor([1.0, 0.5, 2.0, 3.0])
    ours = mo.losses.CrossBatchMemory(
        mo.losses.ContrastiveLoss(reducer=pr.ClassWeightedReducer(w)), 5, memory_size=24)
    theirs = pl.CrossBatchMemory(pl.ContrastiveLoss(reducer=pr.ClassWeightedReducer(w)), 5,
                                 memory_size=24).double()
    for seed in range(3):
        x, y = _batch(b=8, seed=seed)
        va = ours(x.clone().requires_grad_(True), y)
        vb = theirs(x.clone().requires_grad_(True), y)
        torch.testing.assert_close(va, vb.to(va.dtype))


def test_refusals():
    x, y = _batch()
    with pytest.raises(NotImplementedError, match="PerAnchorReducer is called on PML's loss dict"):
        mo.losses.ContrastiveLoss(reducer=pr.PerAnchorReducer(), backend="cpu")(x, y)
    loss = mo.losses.MultiSimilarityLoss(reducer=pr.DoNothingReducer(), metrix=mo.Metrix())
    with pytest.raises(ValueError, match="returned the loss dict, to which the Metrix term"):
        loss(x, y, lam=0.5)
    xbm = mo.losses.CrossBatchMemory(mo.losses.MultiSimilarityLoss(
        reducer=pr.DoNothingReducer(), metrix=mo.Metrix()), 5, memory_size=30)
    with pytest.raises(ValueError, match="returned the loss dict, to which the Metrix term"):
        xbm(x, y, lam=0.5)
    with pytest.raises(TypeError, match="reducer must be a reducer"):
        mo.losses.ContrastiveLoss(reducer="mean")(x, y)


class MeanOfSubLosses(pr.MultipleReducers):  # a user's subclasses of PML's dict reducers
    def sub_loss_reduction(self, sub_losses, embeddings=None, labels=None):
        return sub_losses.mean()


class MyDoNothing(pr.DoNothingReducer):
    pass


def test_subclasses_of_the_dict_reducers_take_the_whole_dict_as_pml():
    x, y = _batch(seed=3)
    ours = mo.losses.ContrastiveLoss(reducer=MeanOfSubLosses({}))
    theirs = pl.ContrastiveLoss(reducer=MeanOfSubLosses({}))
    assert_close_vg(lambda e: ours(e, y), lambda e: theirs(e, y), x)
    _assert_same_dicts(mo.losses.ContrastiveLoss(reducer=MyDoNothing())(x, y),
                       pl.ContrastiveLoss(reducer=MyDoNothing())(x, y))


@pytest.mark.parametrize("name", ["ContrastiveLoss", "MultiSimilarityLoss", "TripletMarginLoss"])
def test_empty_batch_through_pml_reducers_as_pml(name):
    x, y = torch.zeros(0, 5, requires_grad=True), torch.zeros(0, dtype=torch.long)
    got = getattr(mo.losses, name)(reducer=pr.DoNothingReducer())(x, y)
    want = getattr(pl, name)(reducer=pr.DoNothingReducer())(x, y)
    _assert_same_dicts(got, want)  # PML's zero_losses(): its sub-loss names, already reduced
    for red in (lambda: pr.PerAnchorReducer(), lambda: pr.ClassWeightedReducer(torch.ones(3))):
        got = getattr(mo.losses, name)(reducer=red())(x, y)
        assert float(got.detach()) == float(getattr(pl, name)(reducer=red())(x, y).detach()) == 0
        got.backward()
        assert x.grad is not None and x.grad.shape == x.shape


def test_the_loss_keeps_a_copy_of_the_users_reducer_as_pml():
    # PML deep-copies a reducer other than MultipleReducers / DoNothingReducer
    x, y = _batch(seed=4)
    for lib in (pl, mo.losses):
        red = pr.ClassWeightedReducer(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        loss = lib.ContrastiveLoss(reducer=red)
        loss(x, y)  # (PML's reducer casts its weights to the batch's dtype)
        assert red.weights.dtype == torch.float32 and loss.reducer is not red
    dn = pr.DoNothingReducer()
    assert mo.losses.ContrastiveLoss(reducer=dn).reducer is dn
