"""SelfSupervisedLoss and MultipleLosses (metrix_ops.losses) against PML's wrappers around
PML's losses: values and gradients in fp64 over odd shapes (B = 1 included), symmetric and
not, lists and dicts with miners and weights; and their argument checks."""
import pytest
import torch
from pytorch_metric_learning import losses as pl
from pytorch_metric_learning import miners as pm

import metrix_ops as mo
from metrix_ops.losses.self_supervised import SUPPORTED
from cases import assert_close_vg

HYPER = {"ContrastiveLoss": {"pos_margin": 0.1, "neg_margin": 0.8},
         "TripletMarginLoss": {"margin": 0.3}, "NTXentLoss": {"temperature": 0.2},
         "MultiSimilarityLoss": {"alpha": 1.5, "beta": 20.0}}


def _views(b, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    return x, x + 0.3 * torch.randn(b, d, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("b,d", [(1, 3), (5, 4), (13, 7)])
@pytest.mark.parametrize("name", SUPPORTED)
def test_self_supervised_matches_pml(name, b, d, symmetric, backend):
    kw = HYPER.get(name, {})
    ours = mo.losses.SelfSupervisedLoss(getattr(mo.losses, name)(backend=backend, **kw),
                                        symmetric=symmetric)
    theirs = pl.SelfSupervisedLoss(getattr(pl, name)(**kw), symmetric=symmetric)
    x, r = _views(b, d, seed=b)
    assert_close_vg(lambda e, f: ours(e, f), lambda e, f: theirs(e, f), x, r)


def test_self_supervised_takes_the_wrapped_loss_options():
    """With Metrix and a regularizer on the wrapped loss: the wrapped loss of the two views
    with labels 0..B−1 twice (the same λ)."""
    inner = mo.losses.NTXentLoss(embedding_regularizer=mo.regularizers.LpRegularizer())
    inner_mx = mo.losses.MultiSimilarityLoss(metrix=mo.Metrix(weight=0.5))
    x, r = _views(9, 5, seed=3)
    lab = torch.arange(9)
    for loss, call in ((inner, {}), (inner_mx, {"lam": 0.4})):
        assert_close_vg(lambda e, f: mo.losses.SelfSupervisedLoss(loss)(e, f, **call),
                        lambda e, f: loss(torch.cat([e, f]), torch.cat([lab, lab]), **call), x, r)


def test_self_supervised_bad_arguments():
    for loss in (mo.losses.ProxyAnchorLoss(3, 4), pl.NTXentLoss(), "NTXentLoss"):
        with pytest.raises(TypeError, match="SelfSupervisedLoss wraps one of"):
            mo.losses.SelfSupervisedLoss(loss)
    with pytest.raises(TypeError, match="symmetric must be a bool"):
        mo.losses.SelfSupervisedLoss(mo.losses.NTXentLoss(), symmetric="yes")
    ssl = mo.losses.SelfSupervisedLoss(mo.losses.NTXentLoss())
    x, r = _views(6, 4, seed=0)
    with pytest.raises(ValueError, match="ref_emb must be the second view"):
        ssl(x, r[:5])
    with pytest.raises(ValueError, match="ref_emb contains NaN"):
        ssl(x, r.index_fill(0, torch.tensor([2]), float("nan")))


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(17, 6, generator=g, dtype=torch.float64),
            torch.randint(0, 4, (17,), generator=g))


def test_multiple_losses_list_matches_pml():
    x, y = _batch()
    ours = mo.losses.MultipleLosses(
        [mo.losses.MultiSimilarityLoss(backend="cpu"), mo.losses.TripletMarginLoss(margin=0.2),
         mo.losses.ContrastiveLoss()],
        miners=[mo.miners.MultiSimilarityMiner(), None, mo.miners.TripletMarginMiner(margin=0.1)],
        weights=[0.5, 2, 1.5])
    theirs = pl.MultipleLosses(
        [pl.MultiSimilarityLoss(), pl.TripletMarginLoss(margin=0.2), pl.ContrastiveLoss()],
        miners=[pm.MultiSimilarityMiner(), None, pm.TripletMarginMiner(margin=0.1)],
        weights=[0.5, 2, 1.5])
    assert_close_vg(lambda e: ours(e, y), lambda e: theirs(e, y), x)


def test_multiple_losses_dict_and_indices_tuple_match_pml():
    x, y = _batch(1)
    ours = mo.losses.MultipleLosses(
        {"ms": mo.losses.MultiSimilarityLoss(), "sc": mo.losses.SupConLoss(temperature=0.2)},
        miners={"ms": mo.miners.MultiSimilarityMiner(epsilon=0.2)}, weights={"ms": 1, "sc": 0.3})
    theirs = pl.MultipleLosses(
        {"ms": pl.MultiSimilarityLoss(), "sc": pl.SupConLoss(temperature=0.2)},
        miners={"ms": pm.MultiSimilarityMiner(epsilon=0.2)}, weights={"ms": 1, "sc": 0.3})
    assert_close_vg(lambda e: ours(e, y), lambda e: theirs(e, y), x)
    # no miners: each loss on the given tuple
    tup = pm.MultiSimilarityMiner()(x, y)
    ours = mo.losses.MultipleLosses([mo.losses.ContrastiveLoss(), mo.losses.CircleLoss()])
    theirs = pl.MultipleLosses([pl.ContrastiveLoss(), pl.CircleLoss()])
    assert_close_vg(lambda e: ours(e, y, tup), lambda e: theirs(e, y, tup), x)


@pytest.mark.parametrize("args,err,msg", [
    (([],), ValueError, "losses is empty"),
    (("ms",), TypeError, "losses must be a list or a dict"),
    (([mo.losses.NTXentLoss(), 3],), TypeError, r"losses\[1\] must be a loss module"),
    (({"a": mo.losses.NTXentLoss()}, None, {"b": 1}), ValueError, "weights must name the losses"),
    (({"a": mo.losses.NTXentLoss()}, {"b": None}), ValueError, "miners must name the losses"),
    (([mo.losses.NTXentLoss()], None, [1, 2]), ValueError, "one entry per loss"),
    (([mo.losses.NTXentLoss()], None, [float("nan")]), ValueError, "finite real number"),
    (([mo.losses.NTXentLoss()], ["miner"]), TypeError, "must be a miner module or None"),
])
def test_multiple_losses_bad_arguments(args, err, msg):
    with pytest.raises(err, match=msg):
        mo.losses.MultipleLosses(*args)


def test_multiple_losses_with_miners_refuse_an_indices_tuple():
    x, y = _batch()
    ml = mo.losses.MultipleLosses([mo.losses.NTXentLoss()], miners=[pm.MultiSimilarityMiner()])
    with pytest.raises(ValueError, match="give no indices_tuple"):
        ml(x, y, pm.MultiSimilarityMiner()(x, y))


def test_multiple_losses_with_an_empty_miners_dict_take_the_tuple_as_pml():
    # PML refuses a tuple only beside a non-empty miners argument (its truth value)
    x, y = _batch(2)
    tup = pm.MultiSimilarityMiner()(x, y)
    ours = mo.losses.MultipleLosses({"c": mo.losses.ContrastiveLoss(), "m": mo.losses.CircleLoss()},
                                    miners={})
    theirs = pl.MultipleLosses({"c": pl.ContrastiveLoss(), "m": pl.CircleLoss()}, miners={})
    assert_close_vg(lambda e: ours(e, y, tup), lambda e: theirs(e, y, tup), x)
