"""What PML users read and pass beside the losses' numbers, against PML 2.9: the miners'
counts (num_triplets, num_pos_pairs, num_neg_pairs), loss.distance / loss.reducer defaults,
learned hyper-parameters (tensors that require grad: values and their gradients), float
labels, MultipleLosses' weights as PML keeps them, and PML's collect_stats flag."""
import numpy as np
import pytest
import torch
from pytorch_metric_learning import losses as pl
from pytorch_metric_learning import miners as pm

import metrix_ops as mo
from cases import assert_close_vg

MINERS = [
    (lambda: mo.miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard"),
     lambda: pm.TripletMarginMiner(margin=0.2, type_of_triplets="semihard")),
    (lambda: mo.miners.TripletMarginMiner(), lambda: pm.TripletMarginMiner()),
    (lambda: mo.miners.BatchHardMiner(), lambda: pm.BatchHardMiner()),
    (lambda: mo.miners.MultiSimilarityMiner(epsilon=0.2), lambda: pm.MultiSimilarityMiner(epsilon=0.2)),
]


def _batch(b=19, d=6, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, d, generator=g, dtype=torch.float64),
            torch.randint(0, classes, (b,), generator=g))


@pytest.mark.parametrize("k", range(len(MINERS)), ids=["semihard", "all", "batch_hard", "ms"])
def test_miner_counts_as_pml(k):
    ours, theirs = MINERS[k][0](), MINERS[k][1]()
    names = ("num_triplets", "num_pos_pairs", "num_neg_pairs")
    assert all(getattr(ours, n) == 0 for n in names)  # (PML's appear at the first call)
    for seed in range(3):
        x, y = _batch(seed=seed)
        ours(x, y), theirs(x, y)
        # PML sets the counts of the tuple's kind; ours keeps the others at 0
        kept = [n for n in names if hasattr(theirs, n)]
        assert kept and [getattr(ours, n) for n in kept] == [getattr(theirs, n) for n in kept]
        assert all(getattr(ours, n) == 0 for n in names if n not in kept)
    assert max(getattr(ours, n) for n in names) > 0


LOSSES = [("ContrastiveLoss", ()), ("TripletMarginLoss", ()), ("MultiSimilarityLoss", ()),
          ("NTXentLoss", ()), ("SupConLoss", ()), ("CircleLoss", ()), ("LiftedStructureLoss", ()),
          ("GeneralizedLiftedStructureLoss", ()), ("NPairsLoss", ()),
          ("ProxyAnchorLoss", (3, 4)), ("ProxyNCALoss", (3, 4))]


@pytest.mark.parametrize("name,args", LOSSES, ids=[n for n, _ in LOSSES])
def test_default_distance_and_reducer_are_objects_as_pml(name, args):
    ours, theirs = getattr(mo.losses, name)(*args), getattr(pl, name)(*args)
    d, pd = ours.distance, theirs.distance
    assert (type(d).__name__, d.normalize_embeddings, d.p, d.power, d.is_inverted) == (
        type(pd).__name__, pd.normalize_embeddings, pd.p, pd.power, pd.is_inverted)
    # PML wraps a loss of several sub-losses in MultipleReducers, one reducer per sub-loss
    pml_red = theirs.reducer
    if hasattr(pml_red, "reducers"):
        pml_red = next(iter(pml_red.reducers.values()))
    assert type(ours.reducer).__name__ == type(pml_red).__name__
    assert type(ours.get_default_distance()) is type(ours.distance)
    given = mo.distances.CosineSimilarity()
    assert getattr(mo.losses, name)(*args, distance=given).distance is given


LEARNED = [("NTXentLoss", "temperature", 0.2), ("SupConLoss", "temperature", 0.3),
           ("CircleLoss", "m", 0.3), ("MultiSimilarityLoss", "beta", 20.0),
           ("MultiSimilarityLoss", "base", 0.4)]


@pytest.mark.parametrize("name,hyper,value", LEARNED, ids=[f"{n}-{h}" for n, h, _ in LEARNED])
def test_learned_hyper_parameters_get_pml_gradients(name, hyper, value):
    """A hyper-parameter given as a tensor that requires grad: `auto` runs the reference,
    which differentiates through it, as PML; an explicit fused backend refuses."""
    x, y = _batch()
    grads = []
    for lib in (mo.losses, pl):
        t = torch.nn.Parameter(torch.tensor(value, dtype=torch.float64))
        loss = getattr(lib, name)(**{hyper: t})
        e = x.clone().requires_grad_(True)
        out = loss(e, y)
        out.backward()
        grads.append((out.detach(), e.grad, t.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    t = torch.nn.Parameter(torch.tensor(value, dtype=torch.float64))
    with pytest.raises(NotImplementedError, match=f"{hyper}.*require grad"):
        getattr(mo.losses, name)(backend="cpu", **{hyper: t})(x, y)
    # a tensor that does not require grad is a constant: the fused op takes it
    fixed = getattr(mo.losses, name)(backend="cpu", **{hyper: torch.tensor(value)})
    torch.testing.assert_close(fixed(x, y), getattr(mo.losses, name)(**{hyper: value})(x, y))


def test_learned_hyper_parameter_with_metrix_differentiates_the_mixed_term_too():
    x, y = _batch()
    t = torch.nn.Parameter(torch.tensor(20.0, dtype=torch.float64))
    loss = mo.losses.MultiSimilarityLoss(beta=t, metrix=mo.Metrix(weight=0.5))
    ref = mo.losses.MultiSimilarityLoss(beta=t, metrix=mo.Metrix(weight=0.5), backend="reference")
    (g_auto,) = torch.autograd.grad(loss(x, y, lam=0.3), t)
    (g_ref,) = torch.autograd.grad(ref(x, y, lam=0.3), t)
    (g_clean,) = torch.autograd.grad(mo.losses.MultiSimilarityLoss(beta=t)(x, y), t)
    torch.testing.assert_close(g_auto, g_ref)
    assert not torch.allclose(g_auto, g_clean)  # the mixed term's part is there


def test_learned_hyper_parameter_in_the_bank_differentiates_its_metrix_term():
    """CrossBatchMemory's Metrix term against the bank takes a learned hyper-parameter on the
    reference too (its ops would take a constant)."""
    x, y = _batch(b=8)
    grads = []
    for backend in ("auto", "reference"):
        t = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
        inner = mo.losses.MultiSimilarityLoss(alpha=t, backend=backend,
                                              metrix=mo.Metrix(weight=0.5))
        xbm = mo.losses.CrossBatchMemory(inner, 6, memory_size=20)
        (g,) = torch.autograd.grad(xbm(x, y, lam=0.4), t)
        grads.append(g)
    torch.testing.assert_close(grads[0], grads[1])
    t = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
    xbm = mo.losses.CrossBatchMemory(mo.losses.MultiSimilarityLoss(
        alpha=t, backend="cpu", metrix=mo.Metrix()), 6, memory_size=20)
    with pytest.raises(NotImplementedError, match="require grad"):
        xbm(x, y, lam=0.4)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_float_labels_of_whole_values_as_pml(backend):
    x, y = _batch()
    for name in ("MultiSimilarityLoss", "TripletMarginLoss", "NTXentLoss"):
        ours = getattr(mo.losses, name)(backend=backend)
        assert_close_vg(lambda e: ours(e, y.double()), lambda e: getattr(pl, name)()(e, y.double()), x)
    pa = mo.losses.ProxyAnchorLoss(4, 6, backend=backend).double()
    torch.testing.assert_close(pa(x, y.float()), pa(x, y))
    for make_ours, make_pml in MINERS:
        for a, b in zip(make_ours()(x, y.float()), make_ours()(x, y)):
            assert torch.equal(a, b)
    xbm = mo.losses.CrossBatchMemory(mo.losses.ContrastiveLoss(), 6, memory_size=40)
    xbm_int = mo.losses.CrossBatchMemory(mo.losses.ContrastiveLoss(), 6, memory_size=40)
    torch.testing.assert_close(xbm(x, y.float()), xbm_int(x, y))


def test_multiple_losses_weights_as_pml_keeps_them():
    x, y = _batch()
    w = [1, np.float32(0.5), torch.tensor(2.0, dtype=torch.float64)]
    ours = mo.losses.MultipleLosses([mo.losses.NTXentLoss(), mo.losses.MultiSimilarityLoss(),
                                     mo.losses.ContrastiveLoss()], weights=w)
    theirs = pl.MultipleLosses([pl.NTXentLoss(), pl.MultiSimilarityLoss(), pl.ContrastiveLoss()],
                               weights=w)
    assert ours.weights is w
    assert_close_vg(lambda e: ours(e, y), lambda e: theirs(e, y), x)
    assert mo.losses.MultipleLosses([mo.losses.NTXentLoss()] * 2).weights == [1, 1]


def test_collect_stats_is_taken():
    assert mo.losses.TripletMarginLoss(margin=0.1, collect_stats=True).collect_stats
    miner = mo.miners.TripletMarginMiner(collect_stats=True)
    x, y = _batch()
    miner(x, y)
    assert miner.collect_stats and miner.num_triplets == pm.TripletMarginMiner()(x, y)[0].numel()


@pytest.mark.parametrize("per_anchor", [1, 3])
@pytest.mark.parametrize("refs", [False, True])
def test_random_triplets_per_anchor_are_pml_draw_for_draw(per_anchor, refs):
    """triplets_per_anchor=k samples PML's triplets at the same seed: the same loss value and
    gradient, not just the same distribution."""
    x, y = _batch(b=23, classes=5, seed=4)
    call = {}
    if refs:
        r, ry = _batch(b=9, classes=5, seed=5)
        call = {"ref_emb": r, "ref_labels": ry}
    ours = mo.losses.TripletMarginLoss(margin=0.3, triplets_per_anchor=per_anchor)
    theirs = pl.TripletMarginLoss(margin=0.3, triplets_per_anchor=per_anchor)

    def seeded(loss):
        def f(e):
            torch.manual_seed(7)
            return loss(e, y, **call)
        return f
    assert_close_vg(seeded(ours), seeded(theirs), x)


class _SubCosine(__import__("pytorch_metric_learning.distances", fromlist=["x"]).CosineSimilarity):
    """A user's subclass of PML's cosine similarity (another class name)."""


def test_circle_takes_a_subclass_of_pml_cosine_as_pml():
    from pytorch_metric_learning import distances as pd
    x, y = _batch()
    ours, theirs = mo.losses.CircleLoss(distance=_SubCosine()), pl.CircleLoss(distance=_SubCosine())
    assert_close_vg(lambda e: ours(e, y), lambda e: theirs(e, y), x)
    with pytest.raises(ValueError, match="CircleLoss requires the distance to be CosineSimilarity"):
        mo.losses.CircleLoss(distance=pd.SNRDistance())(x, y)


@pytest.mark.parametrize("name", ["ContrastiveLoss", "MultiSimilarityLoss", "TripletMarginLoss",
                                  "NTXentLoss", "LiftedStructureLoss", "SupConLoss",
                                  "GeneralizedLiftedStructureLoss", "NPairsLoss"])
def test_other_distances_of_pml_run_on_the_reference_as_pml(name):
    from pytorch_metric_learning import distances as pd
    x, y = _batch()
    for make in (pd.SNRDistance, _SubCosine):
        ours, theirs = getattr(mo.losses, name)(distance=make()), getattr(pl, name)(distance=make())
        assert_close_vg(lambda e: ours(e, y), lambda e: theirs(e, y), x)
    with pytest.raises(NotImplementedError, match="backend='auto' or 'reference'"):
        getattr(mo.losses, name)(distance=pd.SNRDistance(), backend="cpu")(x, y)


def test_other_distances_of_pml_in_miners_as_pml():
    from pytorch_metric_learning import distances as pd
    x, y = _batch()
    for ours, theirs in ((mo.miners.TripletMarginMiner(distance=pd.SNRDistance()),
                          pm.TripletMarginMiner(distance=pd.SNRDistance())),
                         (mo.miners.BatchHardMiner(distance=pd.SNRDistance()),
                          pm.BatchHardMiner(distance=pd.SNRDistance())),
                         (mo.miners.MultiSimilarityMiner(distance=_SubCosine()),
                          pm.MultiSimilarityMiner(distance=_SubCosine()))):
        a, b = ours(x, y), theirs(x, y)
        assert [len(t) for t in a] == [len(t) for t in b]
        if isinstance(ours, mo.miners.MultiSimilarityMiner):  # PML's order too (README)
            assert [t.tolist() for t in a] == [t.tolist() for t in b]
        groups = [(0, 1), (2, 3)] if len(a) == 4 else [(0, 1, 2)]
        for g in groups:
            assert (sorted(zip(*[a[k].tolist() for k in g]))
                    == sorted(zip(*[b[k].tolist() for k in g])))
    with pytest.raises(TypeError, match="distance must be a distance"):
        mo.losses.ContrastiveLoss(distance="cosine")(x, y)


def test_cross_batch_memory_api_as_pml():
    ours = mo.losses.CrossBatchMemory(mo.losses.ContrastiveLoss(), 6, memory_size=10)
    theirs = pl.CrossBatchMemory(pl.ContrastiveLoss(), 6, memory_size=10).double()
    assert set(ours.supported_losses()) <= set(theirs.supported_losses())
    ours.check_loss_support("NTXentLoss")
    with pytest.raises(ValueError, match="does not support ProxyAnchorLoss"):
        ours.check_loss_support("ProxyAnchorLoss")
    for seed in range(3):  # 7 + 7 + 7 rows wrap around a bank of 10
        x, y = _batch(b=7, seed=seed)
        ours(x, y), theirs(x, y)
        assert torch.equal(ours.curr_batch_idx, theirs.curr_batch_idx)



class _PmlStyleMiner(mo.miners.BaseMiner):
    """A custom miner written for PML: mine() without same_set, every (anchor, other) pair of
    the same label closer than the batch's median distance."""

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        d = torch.cdist(embeddings, ref_emb)
        same = labels[:, None] == ref_labels[None]
        close = d < d.median()
        a1, p = torch.where(same & close)
        a2, n = torch.where(~same & close)
        return a1, p, a2, n


class _PmlTheirs(pm.BaseMiner):
    def mine(self, embeddings, labels, ref_emb, ref_labels):
        return _PmlStyleMiner.mine(self, embeddings, labels, ref_emb, ref_labels)


@pytest.mark.parametrize("refs", [False, True])
def test_custom_miner_written_for_pml_runs_as_pml(refs):
    x, y = _batch(b=17, seed=3)
    r, yr = _batch(b=11, seed=4) if refs else (None, None)
    ours, theirs = _PmlStyleMiner(), _PmlTheirs()
    got, want = ours(x, y, r, yr), theirs(x, y, r, yr)
    assert [t.tolist() for t in got] == [t.tolist() for t in want]
    assert (ours.num_pos_pairs, ours.num_neg_pairs) == (theirs.num_pos_pairs, theirs.num_neg_pairs)
    # the tuple feeds a loss as PML's does, and as the loss's miner= option
    loss, ref = mo.losses.ContrastiveLoss(), pl.ContrastiveLoss()
    if not refs:
        assert_close_vg(lambda e: loss(e, y, ours(e, y)), lambda e: ref(e, y, theirs(e, y)), x)
        assert_close_vg(lambda e: mo.losses.ContrastiveLoss(miner=_PmlStyleMiner())(e, y),
                        lambda e: ref(e, y, theirs(e, y)), x)


@pytest.mark.parametrize("bad, error, words", [
    (lambda x, y, r, yr: torch.arange(3), TypeError, "tuple of 3"),
    (lambda x, y, r, yr: (torch.arange(3), torch.arange(3), torch.arange(2)), ValueError,
     "lengths [3, 3, 2]"),
    (lambda x, y, r, yr: (torch.arange(3), torch.arange(2), torch.arange(2), torch.arange(2)),
     ValueError, "a1 == p"),
])
def test_custom_miner_with_a_bad_output_is_named(bad, error, words):
    class Bad(mo.miners.BaseMiner):
        def mine(self, embeddings, labels, ref_emb, ref_labels):
            return bad(embeddings, labels, ref_emb, ref_labels)

    x, y = _batch(b=6)
    with pytest.raises(error, match="Bad.mine") as info:
        Bad()(x, y)
    assert words in str(info.value)


@pytest.mark.parametrize("name, kwargs", [
    ("LpDistance", {}), ("LpDistance", dict(normalize_embeddings=False, p=1)),
    ("LpDistance", dict(power=2)), ("CosineSimilarity", {}),
    ("DotProductSimilarity", dict(normalize_embeddings=False))])
def test_distances_are_modules_computing_pml_matrices(name, kwargs):
    from pytorch_metric_learning import distances as pd
    ours, theirs = getattr(mo.distances, name)(**kwargs), getattr(pd, name)(**kwargs)
    assert isinstance(ours, torch.nn.Module) and not list(ours.parameters())
    x, _ = _batch(b=9, seed=5)
    r, _ = _batch(b=4, seed=6)
    for args in ((x,), (x, r)):
        torch.testing.assert_close(ours(*args), theirs(*args))
    torch.testing.assert_close(ours.get_norm(x), theirs.get_norm(x))
    torch.testing.assert_close(ours.normalize(x), theirs.normalize(x))
    # a loss holds its distance as a submodule, as PML's losses do
    loss = mo.losses.ContrastiveLoss(distance=ours)
    assert dict(loss.named_children())["distance"] is ours
    with pytest.raises(ValueError, match="ref must have the query's embedding size 6"):
        ours(x, torch.randn(3, 5, dtype=x.dtype))


def test_pml_style_miner_api():
    """What custom miners written for PML use: the default distance (PML's LpDistance),
    super().mine() with PML's four arguments from a subclass of one of our miners, settable
    counts, add_to_recordable_attributes and reset_stats."""
    class Counting(mo.miners.MultiSimilarityMiner):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.add_to_recordable_attributes(name="calls_pos", is_stat=True)

        def mine(self, embeddings, labels, ref_emb, ref_labels):
            out = super().mine(embeddings, labels, ref_emb, ref_labels)
            self.calls_pos += len(out[0])
            return out

    class ByDistance(mo.miners.BaseMiner):
        def mine(self, embeddings, labels, ref_emb, ref_labels):
            d = self.distance(embeddings, ref_emb)  # PML's default: LpDistance
            a, n = torch.where((labels[:, None] != ref_labels[None]) & (d < 1.0))
            return a, n, a, n

    x, y = _batch(b=21, seed=7)
    r, yr = _batch(b=8, seed=8)
    m = Counting(epsilon=0.2)
    assert m.calls_pos == 0
    for args in ((x, y), (x, y, r, yr)):
        got, want = m(*args), pm.MultiSimilarityMiner(epsilon=0.2)(*args)
        for i in (0, 2):  # the positive pairs, the negative pairs (order within rows aside)
            assert (sorted(zip(got[i].tolist(), got[i + 1].tolist()))
                    == sorted(zip(want[i].tolist(), want[i + 1].tolist())))
        assert m.calls_pos == len(want[0]) == m.num_pos_pairs  # reset_stats at each call
    m.num_pos_pairs = 0  # PML's counts are plain attributes
    assert m.num_pos_pairs == 0
    assert isinstance(ByDistance().distance, mo.distances.LpDistance)
    got = ByDistance()(x, y)
    d = torch.cdist(torch.nn.functional.normalize(x), torch.nn.functional.normalize(x))
    assert len(got[0]) == int(((y[:, None] != y[None]) & (d < 1.0)).sum()) > 0


@pytest.mark.parametrize("name", ["NPairsLoss", "ProxyAnchorLoss", "ProxyNCALoss"])
def test_ref_emb_that_is_the_batch_is_taken_as_pml(name):
    """PML's ref_not_supported takes ref_emb/ref_labels that are the batch's own objects (its
    forward sets them so when None); other references are refused, on both sides."""
    from pytorch_metric_learning import losses as pl
    x, y = _batch(classes=5)
    args = (5, x.shape[1]) if name.startswith("Proxy") else ()
    ours = getattr(mo.losses, name)(*args).double()
    pml = getattr(pl, name)(*args).double()
    if args:
        with torch.no_grad():
            ours.proxies.copy_(pml.proxies)
    assert_close_vg(lambda e: ours(e, y, None, e, y), lambda e: pml(e, y, None, e, y), x)
    for other in ((x.clone(), y), (x, y.clone())):
        with pytest.raises(ValueError, match="ref_emb"):
            pml(x, y, None, *other)
        with pytest.raises(ValueError, match="ref_emb"):
            ours(x, y, None, *other)


REGS = {"embedding_regularizer": lambda: mo.regularizers.LpRegularizer()}
LOSS_ARGS = [("ContrastiveLoss", ()), ("MultiSimilarityLoss", ()), ("TripletMarginLoss", ()),
             ("NTXentLoss", ()), ("CircleLoss", ()), ("ProxyAnchorLoss", (3, 4)),
             ("ProxyNCALoss", (3, 4)), ("GeneralizedLiftedStructureLoss", ())]


@pytest.mark.parametrize("name,args", LOSS_ARGS)
@pytest.mark.parametrize("regs", [(), ("embedding",), ("embedding", "weight")])
def test_sub_loss_names_and_zero_losses_as_pml(name, args, regs):
    from pytorch_metric_learning import losses as pl
    from pytorch_metric_learning import regularizers as pr
    if "weight" in regs and not args:
        pytest.skip("weight_regularizer is the proxy losses' option")
    kw = {f"{r}_regularizer": None for r in regs}
    ours = getattr(mo.losses, name)(*args, **{k: mo.regularizers.LpRegularizer() for k in kw})
    pml = getattr(pl, name)(*args, **{k: pr.LpRegularizer() for k in kw})
    assert ours.sub_loss_names() == pml.sub_loss_names()
    assert ours.zero_losses() == pml.zero_losses()


def test_set_reducer_and_records_on_a_loss_as_pml():
    from pytorch_metric_learning import losses as pl
    from pytorch_metric_learning import reducers as pr
    x, y = _batch()
    ours, pml = mo.losses.ContrastiveLoss(), pl.ContrastiveLoss()
    red = pr.ThresholdReducer(low=0.1)
    ours.set_reducer(red)
    pml.set_reducer(red)
    assert ours.reducer is not red  # a copy, as PML's losses keep one
    torch.testing.assert_close(ours(x, y), pml(x, y))
    ours.set_reducer(None)
    assert type(ours.reducer).__name__ == "AvgNonZeroReducer"
    ours.add_to_recordable_attributes(name="my_stat", is_stat=True)
    ours.my_stat = 5
    ours.reset_stats()
    assert ours.my_stat == 0


@pytest.mark.parametrize("name", ["ProxyAnchorLoss", "ProxyNCALoss"])
def test_proxy_get_logits_and_cast_types_as_pml(name):
    from pytorch_metric_learning import losses as pl
    x, _ = _batch(b=9, d=5)
    ours, pml = getattr(mo.losses, name)(4, 5), getattr(pl, name)(4, 5)
    with torch.no_grad():
        ours.proxies.copy_(pml.proxies)
    pml.cast_types(torch.float64, x.device)
    ours.cast_types(torch.float64, x.device)
    assert ours.proxies.dtype == torch.float64 and isinstance(ours.proxies, torch.nn.Parameter)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    la, lb = ours.get_logits(a), pml.get_logits(b)
    assert la.shape == (9, 4)
    torch.testing.assert_close(la, lb)
    la.square().sum().backward()
    lb.square().sum().backward()
    torch.testing.assert_close(a.grad, b.grad)
    torch.testing.assert_close(ours.proxies.grad, pml.proxies.grad)
    if name == "ProxyNCALoss":
        assert torch.equal(ours.proxy_labels, pml.proxy_labels)


@pytest.mark.parametrize("make", [lambda r: r.MeanReducer(), lambda r: r.SumReducer(),
                                  lambda r: r.AvgNonZeroReducer(),
                                  lambda r: r.ThresholdReducer(low=0.2, high=0.9)],
                         ids=["mean", "sum", "avg_non_zero", "threshold"])
def test_our_reducers_are_modules_called_as_pml(make):
    from pytorch_metric_learning import reducers as pr
    ours, pml = make(mo.reducers), make(pr)
    assert isinstance(ours, torch.nn.Module)
    x, y = _batch()
    g = torch.Generator().manual_seed(3)
    terms = torch.relu(torch.randn(len(y), generator=g, dtype=torch.float64))
    loss_dict = {"loss": {"losses": terms, "indices": torch.arange(len(y)),
                          "reduction_type": "element"}}
    torch.testing.assert_close(ours(loss_dict, x, y), pml(loss_dict, x, y))
    loss = mo.losses.MultiSimilarityLoss(reducer=ours)
    assert dict(loss.named_modules())["reducer"] is loss.reducer


@pytest.mark.parametrize("b,classes", [(0, 3), (1, 3), (2, 1), (7, 7), (13, 4), (23, 9)])
def test_npairs_num_pairs_as_pml(b, classes):
    """PML's NPairsLoss statistic: the pairs its last call kept, one per label with a
    positive pair (of the batch, or of an indices_tuple's anchors); 0 after reset_stats."""
    x, y = _batch(b=b, classes=classes, seed=b)
    ours = mo.losses.NPairsLoss(backend="reference" if b == 0 else "auto")
    pml = pl.NPairsLoss()
    assert ours.num_pairs == 0
    tuples = [None]
    if b:
        tuples += [pm.TripletMarginMiner(1.0)(x, y), pm.PairMarginMiner(0.3, 0.9)(x, y)]
    for tup in tuples:
        torch.testing.assert_close(ours(x, y, tup), pml(x, y, tup))
        assert ours.num_pairs == pml.num_pairs
    y2 = y.clone()
    ours(x, y2), pml(x, y2)
    y2.copy_(torch.arange(b))  # a reused label buffer: the count is the call's
    assert ours.num_pairs == pml.num_pairs == ours.num_pairs  # read twice: the count is kept
    assert ours.num_pairs > 0 or b < 2 or b == classes  # these batches have pairs to count
    ours.reset_stats()
    assert ours.num_pairs == 0


RECORDED = [(n, a) for n, a in LOSS_ARGS] + [("SupConLoss", ()), ("LiftedStructureLoss", ()),
                                             ("NPairsLoss", ())]


@pytest.mark.parametrize("name,args", RECORDED)
@pytest.mark.parametrize("regularized", [False, True])
def test_recorded_attributes_as_pml(name, args, regularized):
    """PML's lists of recordable attributes (`_record_these`, read by its logging hooks):
    the same names, holding the same values (PML's ProxyNCA lists num_classes but leaves it
    0: ours holds the number)."""
    from pytorch_metric_learning import losses as pl
    from pytorch_metric_learning import regularizers as pr
    kw_ours, kw_pml = {}, {}
    if regularized:
        kw_ours["embedding_regularizer"] = mo.regularizers.LpRegularizer()
        kw_pml["embedding_regularizer"] = pr.LpRegularizer()
        if args:
            kw_ours["weight_regularizer"] = mo.regularizers.LpRegularizer()
            kw_pml["weight_regularizer"] = pr.LpRegularizer()
    ours = getattr(mo.losses, name)(*args, **kw_ours)
    pml = getattr(pl, name)(*args, **kw_pml)
    names = getattr(pml, "_record_these", [])
    assert sorted(getattr(ours, "_record_these", [])) == sorted(names)
    for n in names:
        if not (name == "ProxyNCALoss" and n == "num_classes"):
            assert getattr(ours, n) == getattr(pml, n), n
    assert ours.distance._record_these == pml.distance._record_these
    if name == "CircleLoss":  # derived from m, as PML's
        assert (ours.op, ours.on, ours.delta_p, ours.delta_n) == (1.4, -0.4, 0.6, 0.4)


STAT_MINERS = {
    "triplet_margin": (lambda m, d: m.TripletMarginMiner(0.3, collect_stats=True, distance=d),
                       ("pos_pair_dist", "neg_pair_dist", "avg_triplet_margin")),
    "batch_hard": (lambda m, d: m.BatchHardMiner(collect_stats=True, distance=d),
                   ("easiest_triplet", "hardest_triplet", "easiest_pos_pair",
                    "hardest_pos_pair", "easiest_neg_pair", "hardest_neg_pair")),
}


@pytest.mark.parametrize("kind", sorted(STAT_MINERS))
@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("b,classes", [(1, 2), (2, 1), (9, 9), (17, 3), (30, 5)])
def test_miner_collect_stats_as_pml(kind, cosine, b, classes):
    """PML's per-call statistics of a miner built with collect_stats=True: the streamed row
    blocks (a few rows at a time) give the values of PML's whole matrix, also against
    ref_emb, and on a batch with no triplet (one class, B = 1) what PML leaves (NaN means,
    or 0); the registered names in PML's list. Also as the loss option miner=, which then
    runs PML's two calls."""
    from pytorch_metric_learning import distances as pdist
    make, names = STAT_MINERS[kind]
    x, y = _batch(b=b, classes=classes, seed=b + 7 * cosine)
    r, yr = _batch(b=b + 3, classes=classes, seed=b + 1)
    ours = make(mo.miners, mo.distances.CosineSimilarity() if cosine else None)
    pml = make(pm, pdist.CosineSimilarity() if cosine else pdist.LpDistance())
    ours.block_entries = 4 * (b + 3)  # blocks of about four rows
    assert ours._record_these_stats == pml._record_these_stats
    for args in ((x, y), (x, y, r, yr)):
        got, want = ours(*args), pml(*args)
        assert all(torch.equal(g, w) for g, w in zip(got, want))
        for n in names:
            a, e = getattr(ours, n), getattr(pml, n)
            assert (a != a and e != e) or a == pytest.approx(e, rel=1e-12, abs=1e-12), n
    loss = mo.losses.TripletMarginLoss(miner=ours)
    torch.testing.assert_close(loss(x, y), pl.TripletMarginLoss()(x, y, pml(x, y)))
    for n in names:
        a, e = getattr(ours, n), getattr(pml, n)
        assert (a != a and e != e) or a == pytest.approx(e, rel=1e-12, abs=1e-12), n


def test_cross_batch_memory_records_as_pml():
    from pytorch_metric_learning import losses as pl
    ours = mo.losses.CrossBatchMemory(mo.losses.ContrastiveLoss(), 6, memory_size=10)
    pml = pl.CrossBatchMemory(pl.ContrastiveLoss(), 6, memory_size=10)
    x, y = _batch(b=7, d=6)
    ours(x, y), pml(x, y)
    assert ours._record_these == pml._record_these
    assert [getattr(ours, n) for n in ours._record_these] == [
        getattr(pml, n) for n in pml._record_these]


def test_only_miners_with_statistics_leave_the_fused_op():
    """collect_stats=True sends a miner to PML's two calls only when PML records statistics of
    its distances (TripletMarginMiner, BatchHardMiner); MultiSimilarityMiner's are its counts,
    which the fused op gives, so it stays fused."""
    from metrix_ops.fused import keeps_call_stats
    for make in (mo.miners, pm):
        assert keeps_call_stats(make.TripletMarginMiner(collect_stats=True))
        assert keeps_call_stats(make.BatchHardMiner(collect_stats=True))
        assert not keeps_call_stats(make.TripletMarginMiner())
        assert not keeps_call_stats(make.MultiSimilarityMiner(collect_stats=True))


NORM_CASES = {  # loss factory given the module (ours or PML's) and a distance
    "contrastive": lambda m, d: m.ContrastiveLoss(distance=d),
    "ms-cosine": lambda m, d: m.MultiSimilarityLoss(distance=d),
    "triplet-lp1": lambda m, d: m.TripletMarginLoss(distance=d),
    "npairs": lambda m, d: m.NPairsLoss(distance=d),
    "proxy-anchor": lambda m, d: m.ProxyAnchorLoss(5, 6, distance=d),
    "proxy-nca": lambda m, d: m.ProxyNCALoss(5, 6, distance=d),
}
NORM_DISTANCES = {"contrastive": ("LpDistance", {}), "ms-cosine": ("CosineSimilarity", {}),
                  "triplet-lp1": ("LpDistance", dict(p=1, normalize_embeddings=False)),
                  "npairs": ("DotProductSimilarity", {}), "proxy-anchor": ("CosineSimilarity", {}),
                  "proxy-nca": ("LpDistance", dict(power=2))}


def _norm_stats(d):
    return [getattr(d, n) for n in mo.distances.NORM_STATS]


@pytest.mark.parametrize("case", sorted(NORM_CASES))
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_distance_norm_stats_as_pml(case, backend):
    """A distance built with collect_stats=True keeps PML's four mean norms of the call the
    loss makes on it (the batch against ref_emb or itself, against the proxies, NPairs'
    kept anchors against their positives), though the fused ops never call it; none are
    read in the call (the values stay on the device until read); a Metrix term's calls on
    mixed candidates do not replace them."""
    from pytorch_metric_learning import distances as pdist
    from host_reads import SyncCounter
    cls, kw = NORM_DISTANCES[case]
    ours = NORM_CASES[case](mo.losses, getattr(mo.distances, cls)(collect_stats=True, **kw))
    ours.backend = backend
    pml = NORM_CASES[case](pl, getattr(pdist, cls)(collect_stats=True, **kw))
    if hasattr(pml, "proxies"):
        pml.proxies.data.copy_(ours.proxies.data)
    x, y = _batch(b=27, classes=5, seed=3)
    x = x * 2.5
    calls = [(x, y)] + ([(x[:9], y[:9], None, x[9:], y[9:])] if case == "triplet-lp1" else [])
    for args in calls:
        with SyncCounter() as counter:
            ours(*args)
        pml(*args)
        # (NPairs finds its pairs on the host; an L1 distance runs the reference)
        if backend == "auto" and case not in ("npairs", "triplet-lp1"):
            assert counter.total <= 1, dict(counter.sites)  # the input check's one read
        got, want = _norm_stats(ours.distance), _norm_stats(pml.distance)
        assert got == pytest.approx(want, rel=1e-12), (got, want)
        # the rows were not unit rows: a normalising distance's before and after differ
        assert (got[0] != got[2]) == ours.distance.normalize_embeddings
    ours.distance.reset_stats()
    assert _norm_stats(ours.distance) == [0, 0, 0, 0]
    if case == "ms-cosine":  # Metrix: still the clean call's pair
        ours.metrix = mo.Metrix(lam=0.4)
        ours(x, y)
        assert _norm_stats(ours.distance) == pytest.approx(want, rel=1e-12)


def test_miner_and_bank_distance_norm_stats_as_pml():
    """A miner's distance records (embeddings, ref_emb) as PML's miners' calls do, as a
    standalone miner and as the loss option miner= (run inside the fused op); the wrapped
    loss of CrossBatchMemory records the batch against the bank; PML's own distance objects
    given to our loss record through PML's code."""
    from pytorch_metric_learning import distances as pdist
    x, y = _batch(b=15, classes=4, seed=8)
    x = x * 0.3
    r = torch.randn(11, 6, dtype=torch.float64) * 4
    ours = mo.miners.MultiSimilarityMiner(distance=mo.distances.CosineSimilarity(collect_stats=True))
    pml = pm.MultiSimilarityMiner(distance=pdist.CosineSimilarity(collect_stats=True))
    for args in ((x, y), (x, y, r, torch.randint(0, 4, (11,)))):
        ours(*args), pml(*args)
        assert _norm_stats(ours.distance) == pytest.approx(_norm_stats(pml.distance), rel=1e-12)
    ours.distance.reset_stats()
    mo.losses.MultiSimilarityLoss(miner=ours)(x, y)
    pml(x, y)
    assert _norm_stats(ours.distance) == pytest.approx(_norm_stats(pml.distance), rel=1e-12)
    # PML's distance object in our loss: PML's set_default_stats fills it
    theirs = pdist.LpDistance(collect_stats=True)
    mo.losses.ContrastiveLoss(distance=theirs)(x, y)
    pl.ContrastiveLoss(distance=pdist.LpDistance(collect_stats=True))(x, y)
    assert _norm_stats(theirs) == pytest.approx([x.norm(dim=1).mean().item()] * 2 + [1.0, 1.0])
    bank_o = mo.losses.CrossBatchMemory(mo.losses.ContrastiveLoss(
        distance=mo.distances.LpDistance(collect_stats=True)), 6, memory_size=20)
    bank_p = pl.CrossBatchMemory(pl.ContrastiveLoss(
        distance=pdist.LpDistance(collect_stats=True)), 6, memory_size=20)
    for step in range(3):
        xb = x[5 * step:5 * step + 5] * (step + 1)
        bank_o(xb, y[5 * step:5 * step + 5]), bank_p(xb, y[5 * step:5 * step + 5])
        assert _norm_stats(bank_o.loss.distance) == pytest.approx(
            _norm_stats(bank_p.loss.distance), rel=1e-12)


SUBCLASS_CASES = {  # (name, constructor kwargs, the sub-loss the subclass scales)
    "contrastive": ("ContrastiveLoss", {}, "pos_loss"),
    "ms": ("MultiSimilarityLoss", {}, "loss"),
    "triplet": ("TripletMarginLoss", dict(margin=0.3), "loss"),
    "proxy-anchor": ("ProxyAnchorLoss", dict(num_classes=4, embedding_size=6), "pos_loss"),
    "npairs": ("NPairsLoss", {}, "loss"),
    "ntxent": ("NTXentLoss", {}, "loss"),
}


def _scaling_subclass(base, key):
    class Scaled(base):  # a user's loss on top of another, PML's way
        def compute_loss(self, *args):
            d = super().compute_loss(*args)
            if torch.is_tensor(d[key]["losses"]):
                d[key]["losses"] = d[key]["losses"] * 3
            return d
    return Scaled


@pytest.mark.parametrize("case", sorted(SUBCLASS_CASES))
def test_subclass_overriding_compute_loss_runs_as_pml(case):
    """A subclass that overrides compute_loss (PML's extension point) gets PML's forward: its
    loss dict, the reducer, the regularizer, an indices_tuple, and ref_emb where the loss
    takes it, equal to the same subclass of PML's loss; the library's own options that
    cannot go through a loss dict (Metrix) are refused, naming the method. Without an
    override, compute_loss gives the dict the reduced loss comes from."""
    name, kw, key = SUBCLASS_CASES[case]
    reg = dict(embedding_regularizer=mo.regularizers.LpRegularizer(), embedding_reg_weight=0.1)
    preg = dict(embedding_regularizer=__import__(
        "pytorch_metric_learning.regularizers", fromlist=["x"]).LpRegularizer(),
        embedding_reg_weight=0.1)
    ours = _scaling_subclass(getattr(mo.losses, name), key)(**kw, **reg)
    pml = _scaling_subclass(getattr(pl, name), key)(**kw, **preg)
    if hasattr(pml, "proxies"):
        pml.proxies.data.copy_(ours.proxies.data)
    x, y = _batch(b=21, classes=4, seed=12)
    calls = [(x, y), (x, y, pm.BatchEasyHardMiner()(x, y)
                      if case != "triplet" else pm.TripletMarginMiner(0.2)(x, y))]
    if case in ("contrastive", "triplet"):
        calls.append((x[:11], y[:11], None, x[11:], y[11:]))
    for args in calls:
        assert_close_vg(lambda e: ours(e, *args[1:]), lambda e: pml(e, *args[1:]), args[0])
    plain = getattr(mo.losses, name)(**kw, **reg)
    if hasattr(plain, "proxies"):
        plain.proxies.data.copy_(ours.proxies.data)
    assert ours(x, y).item() != pytest.approx(plain(x, y).item(), rel=1e-9)  # the override ran
    from metrix_ops.reducers import reduce_loss_dict
    plain.embedding_regularizer = None
    d = plain.compute_loss(x, y, None, None, None)
    torch.testing.assert_close(reduce_loss_dict(d, plain.reducer, x, y, loss_name=name),
                               plain(x, y))
    ours.metrix = mo.Metrix(lam=0.3)
    with pytest.raises(NotImplementedError, match="overrides compute_loss"):
        ours(x, y)


def _scale_all(base):
    """A subclass scaling every entry of the dict, the regularizers' included; named as its
    base (PML's CrossBatchMemory checks the class name)."""
    def compute_loss(self, *args):
        return {k: dict(v, losses=v["losses"] * 3) for k, v in
                base.compute_loss(self, *args).items()}
    return type(base.__name__, (base,), {"compute_loss": compute_loss})


def test_override_path_checks_and_wrappers_as_pml():
    """The override path: the batch against itself by the label tensor's identity (PML's
    rule); the call's checks (labels' length, ref_emb where the loss takes none); a
    CrossBatchMemory wrapping such a subclass calls it on the bank, as PML's; the proxies'
    weight_reg_loss entry in the dict, as PML's proxy losses put it there."""
    x, y = _batch(b=14, classes=3, seed=21)
    ours, pml = _scaling_subclass(mo.losses.NTXentLoss, "loss")(), \
        _scaling_subclass(pl.NTXentLoss, "loss")()
    args = (x, y, None, x, y.clone())  # ref_emb the batch, ref_labels another tensor
    torch.testing.assert_close(ours(*args), pml(*args))
    with pytest.raises(ValueError, match="labels has 5 entries but there are 14"):
        ours(x, y[:5])
    with pytest.raises(ValueError, match="NPairsLoss does not take ref_emb"):
        _scaling_subclass(mo.losses.NPairsLoss, "loss")()(x[:6], y[:6], None, x[6:], y[6:])
    bank_o = mo.losses.CrossBatchMemory(_scale_all(mo.losses.ContrastiveLoss)(), 6,
                                        memory_size=30)
    bank_p = pl.CrossBatchMemory(_scale_all(pl.ContrastiveLoss)(), 6, memory_size=30)
    for step in range(3):
        xb, yb = x[4 * step:4 * step + 6], y[4 * step:4 * step + 6]
        torch.testing.assert_close(bank_o(xb, yb), bank_p(xb, yb))
    from pytorch_metric_learning import regularizers as preg
    ours = _scale_all(mo.losses.ProxyAnchorLoss)(
        3, 6, weight_regularizer=mo.regularizers.LpRegularizer(), weight_reg_weight=0.5)
    pml = _scale_all(pl.ProxyAnchorLoss)(3, 6, weight_regularizer=preg.LpRegularizer(),
                                         weight_reg_weight=0.5)
    pml.proxies.data.copy_(ours.proxies.data)
    assert "weight_reg_loss" in ours.compute_loss(x, y, None, None, None)
    assert_close_vg(lambda e: ours(e, y), lambda e: pml(e, y), x)


def test_norm_stats_kept_where_pml_makes_no_distance_call():
    """PML's pair losses call their distance only where some index list has two entries or
    more, TripletMarginLoss only where there is a triplet: otherwise the previous call's
    statistics stay (ours decide on the device, no host read); also through miner=, whose
    tuple sizes the fused op gives. A PML distance given to our miner gets its statistics;
    resetting reads nothing."""
    from pytorch_metric_learning import distances as pdist
    from host_reads import SyncCounter
    x, y = _batch(b=15, classes=4, seed=5)
    distinct = (x[:4] * 3, torch.arange(4))
    for make, cls in ((lambda m, d: m.TripletMarginLoss(distance=d), "LpDistance"),
                      (lambda m, d: m.ContrastiveLoss(distance=d), "LpDistance"),
                      (lambda m, d: m.MultiSimilarityLoss(
                          distance=d, **({"miner": mo.miners.MultiSimilarityMiner()}
                                         if m is mo.losses else {})), "CosineSimilarity")):
        ours = make(mo.losses, getattr(mo.distances, cls)(collect_stats=True))
        pml = make(pl, getattr(pdist, cls)(collect_stats=True))
        pml_miner = pm.MultiSimilarityMiner() if ours.miner is not None else None
        for args in ((x, y), distinct, (x[:1], y[:1]), (x[:0], y[:0])):
            ours(*args)
            pml(*args, *((pml_miner(*args),) if pml_miner is not None else ()))
            assert _norm_stats(ours.distance) == pytest.approx(_norm_stats(pml.distance),
                                                               rel=1e-12, nan_ok=True)
        with SyncCounter() as counter:
            ours.distance.reset_stats()
        assert counter.total == 0 and _norm_stats(ours.distance) == [0, 0, 0, 0]
    given = pdist.CosineSimilarity(collect_stats=True)
    mo.miners.MultiSimilarityMiner(distance=given)(x, y)
    assert given.initial_avg_query_norm == pytest.approx(x.norm(dim=1).mean().item())


def test_triplet_with_pairs_records_norms_as_pml():
    """TripletMarginLoss given a pair tuple: PML pairs each positive with the negatives of
    the same anchor and calls its distance only if that makes a triplet."""
    from pytorch_metric_learning import distances as pdist
    x, y = _batch(b=8, classes=3, seed=9)
    ours = mo.losses.TripletMarginLoss(distance=mo.distances.LpDistance(collect_stats=True))
    pml = pl.TripletMarginLoss(distance=pdist.LpDistance(collect_stats=True))
    i = lambda *v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    for tup in ((i(0, 1), i(2, 3), i(4, 5), i(6, 7)),   # anchors 0, 1 vs 4, 5: no triplet
                (i(0, 1), i(2, 3), i(1, 5), i(6, 7)),   # anchor 1 in both: a triplet
                (i(), i(), i(0), i(1))):                # no positive pair
        ours(x * 2, y, tup), pml(x * 2, y, tup)
        assert _norm_stats(ours.distance) == pytest.approx(_norm_stats(pml.distance),
                                                           rel=1e-12)
        x = x + 0.5  # each call's norms differ from the last
