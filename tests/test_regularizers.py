"""Regularizers (metrix_ops.regularizers) and the losses' regularization options
(embedding_regularizer / embedding_reg_weight on every loss; weight_regularizer /
weight_reg_weight / weight_init_func on the proxy losses) against PML 2.9: values and
gradients in fp64 over odd shapes and the edge cases; on the fused engines, the Metrix, EE
and miner= paths and the wrappers, the loss with a regularizer is the loss without it plus
weight · regularizer(embeddings)."""
import pytest
import torch
from pytorch_metric_learning import losses as pl
from pytorch_metric_learning import reducers as pr
from pytorch_metric_learning import regularizers as preg

import metrix_ops as mo
from metrix_ops import regularizers as reg
from cases import CASE_IDS, CASES, assert_close_vg, make_case
from triton_cases import DEVICE, on_dev, requires_triton

C = 11  # classes of the proxy losses (the cases' labels are < 11)

REGULARIZERS = [  # (ours, PML's): the same regularizer
    (lambda **k: reg.LpRegularizer(**k), lambda **k: preg.LpRegularizer(**k)),
    (lambda **k: reg.LpRegularizer(p=1, power=2, **k), lambda **k: preg.LpRegularizer(p=1, power=2, **k)),
    (lambda **k: reg.LpRegularizer(p=3, power=0.5, **k), lambda **k: preg.LpRegularizer(p=3, power=0.5, **k)),
    (lambda **k: reg.ZeroMeanRegularizer(**k), lambda **k: preg.ZeroMeanRegularizer(**k)),
    (lambda **k: reg.CenterInvariantRegularizer(**k), lambda **k: preg.CenterInvariantRegularizer(**k)),
    (lambda **k: reg.RegularFaceRegularizer(**k), lambda **k: preg.RegularFaceRegularizer(**k)),
]
REG_IDS = ["lp", "lp_p1_pow2", "lp_p3_pow_half", "zero_mean", "center_invariant", "regular_face"]
REDUCERS = [(None, None), (mo.reducers.SumReducer(), pr.SumReducer()),
            (mo.reducers.ThresholdReducer(low=0.9), pr.ThresholdReducer(low=0.9))]
SHAPES = [(1, 4), (7, 6), (13, 7), (5, 1), (6, 3)]


def _rows(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    if n >= 6:
        x[2] = x[1]       # a duplicate row: ties in RegularFace's nearest row
        x[4] = 0 * x[4]   # a zero row: the norm's subgradient
        x[4, 0] = 1e-3 if d == 1 else 0.0
    return x


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}x{d}" for n, d in SHAPES])
@pytest.mark.parametrize("red", range(len(REDUCERS)), ids=["mean", "sum", "threshold"])
@pytest.mark.parametrize("k", range(len(REGULARIZERS)), ids=REG_IDS)
def test_regularizer_matches_pml(k, red, shape):
    ours_red, pml_red = REDUCERS[red]
    ours = REGULARIZERS[k][0](reducer=ours_red)
    theirs = REGULARIZERS[k][1](reducer=pml_red)
    assert_close_vg(ours, theirs, _rows(*shape, seed=k))


def test_half_rows_are_computed_in_fp32():
    x = torch.randn(9, 5, dtype=torch.bfloat16)
    for make, _ in REGULARIZERS:
        r = make()
        out = r(x)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, r(x.float()))


# ---- the losses' options against PML ------------------------------------------------------

LOSSES = [("ContrastiveLoss", {}), ("MultiSimilarityLoss", {"alpha": 1.3, "beta": 20.0}),
          ("LiftedStructureLoss", {}), ("GeneralizedLiftedStructureLoss", {}), ("CircleLoss", {}),
          ("NTXentLoss", {}), ("SupConLoss", {}), ("TripletMarginLoss", {"margin": 0.3}),
          ("NPairsLoss", {}), ("ProxyAnchorLoss", {}), ("ProxyNCALoss", {})]
PROXY = {"ProxyAnchorLoss", "ProxyNCALoss"}


def _build(name, kw, dim, backend, ours_kw, pml_kw):
    if name in PROXY:
        theirs = getattr(pl, name)(C, dim, **kw, **pml_kw).double()
        ours = getattr(mo.losses, name)(C, dim, backend=backend, **kw, **ours_kw).double()
        with torch.no_grad():
            ours.proxies.copy_(theirs.proxies)
        return ours, theirs
    return (getattr(mo.losses, name)(backend=backend, **kw, **ours_kw),
            getattr(pl, name)(**kw, **pml_kw))


def _value_and_grads(mod, x, y, **call):
    e = x.detach().clone().requires_grad_(True)
    out = mod(e, y, **call)
    leaves = [e] + ([mod.proxies] if hasattr(mod, "proxies") else [])
    grads = torch.autograd.grad(out, leaves, allow_unused=True)
    return [out.detach()] + [torch.zeros_like(t) if g is None else g
                             for t, g in zip(leaves, grads)]


def _assert_same(ours, theirs, x, y, rtol=1e-6, atol=1e-9, **call):
    for a, b in zip(_value_and_grads(ours, x, y, **call), _value_and_grads(theirs, x, y, **call)):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=rtol, atol=atol, equal_nan=True)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("name,kw", LOSSES, ids=[n for n, _ in LOSSES])
def test_embedding_regularizer_matches_pml(name, kw, case, backend):
    x, y = make_case(case)
    # ours with our regularizer and with PML's, each against PML's loss with PML's
    for ours_reg in (reg.LpRegularizer(power=2), preg.LpRegularizer(power=2)):
        ours, theirs = _build(name, kw, x.shape[1], backend,
                              {"embedding_regularizer": ours_reg, "embedding_reg_weight": 0.25},
                              {"embedding_regularizer": preg.LpRegularizer(power=2),
                               "embedding_reg_weight": 0.25})
        _assert_same(ours, theirs, x, y)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("case", CASES[:4] + CASES[-2:], ids=CASE_IDS[:4] + CASE_IDS[-2:])
@pytest.mark.parametrize("name", sorted(PROXY))
def test_weight_regularizer_matches_pml(name, case, backend):
    x, y = make_case(case)
    pairs = [(reg.RegularFaceRegularizer(), preg.RegularFaceRegularizer(), 0.5),
             (reg.CenterInvariantRegularizer(), preg.CenterInvariantRegularizer(), 2.0),
             (preg.LpRegularizer(), preg.LpRegularizer(), 1)]
    for ours_reg, pml_reg, w in pairs:
        ours, theirs = _build(name, {}, x.shape[1], backend,
                              {"weight_regularizer": ours_reg, "weight_reg_weight": w,
                               "embedding_regularizer": reg.ZeroMeanRegularizer()},
                              {"weight_regularizer": pml_reg, "weight_reg_weight": w,
                               "embedding_regularizer": preg.ZeroMeanRegularizer()})
        _assert_same(ours, theirs, x, y)


@pytest.mark.parametrize("name", sorted(PROXY))
def test_weight_init_func_and_default_init_as_pml(name):
    for ours_kw in ({}, {"weight_init_func": torch.nn.init.xavier_uniform_}):
        torch.manual_seed(5)
        ours = getattr(mo.losses, name)(7, 12, **ours_kw)
        torch.manual_seed(5)
        theirs = getattr(pl, name)(7, 12, **ours_kw)
        assert torch.equal(ours.proxies, theirs.proxies)
    ours = getattr(mo.losses, name)(3, 4, weight_init_func=torch.nn.init.ones_)
    assert torch.equal(ours.proxies.detach(), torch.ones(3, 4))


def test_proxy_weight_regularizer_on_an_empty_batch_as_pml():
    """PML adds the proxies' term to the zero loss of an empty batch; the embeddings' term of
    no rows is 0 here (PML's mean over no rows is NaN)."""
    x, y = torch.zeros(0, 6, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    ours, theirs = _build("ProxyAnchorLoss", {}, 6, "auto",
                          {"weight_regularizer": reg.LpRegularizer()},
                          {"weight_regularizer": preg.LpRegularizer()})
    _assert_same(ours, theirs, x, y)
    assert ours(x, y).item() > 0
    for name in ("MultiSimilarityLoss", "ProxyNCALoss"):
        args = (C, 6) if name in PROXY else ()
        mod = getattr(mo.losses, name)(*args, embedding_regularizer=reg.LpRegularizer()).double()
        e = x.detach().clone().requires_grad_(True)
        out = mod(e, y)
        assert torch.isfinite(out) and out.item() == 0.0
        out.backward()
        assert e.grad.shape == e.shape


# ---- the fused paths: loss with a regularizer = loss without + weight · R(embeddings) -------

def _additive(make, x, y, r, w, **call):
    """make(**options) -> loss module; the module with (r, w) against the one without it plus
    w · r(x), values and gradients (same λ: fixed by the calls)."""
    with_reg, without = make(embedding_regularizer=r, embedding_reg_weight=w), make()
    assert_close_vg(lambda e: with_reg(e, y, **call),
                    lambda e: without(e, y, **call) + w * r(e), x)


FUSED_OPTIONS = [
    ("MultiSimilarityLoss", {"metrix": mo.Metrix(weight=0.4)}, {"lam": 0.3}),
    ("ContrastiveLoss", {"metrix": mo.Metrix(weight=0.5, pairs="anchor_neg")}, {"lam": 0.6}),
    ("ProxyAnchorLoss", {"metrix": mo.Metrix(weight=0.4)}, {"lam": 0.3}),
    ("MultiSimilarityLoss", {"expansion": mo.Expansion(n_points=3)}, {}),
    ("HPHNTripletLoss", {"expansion": mo.Expansion(n_points=2, pairs="adjacent")}, {}),
    ("HPHNTripletLoss", {}, {}),
    ("MultiSimilarityLoss", {"miner": mo.miners.MultiSimilarityMiner()}, {}),
    ("TripletMarginLoss", {"miner": mo.miners.BatchHardMiner()}, {}),
]


def _maker(name, backend, options, dim):
    def make(**extra):
        args = (C, dim) if name in PROXY else ()
        torch.manual_seed(0)  # the same proxies in both modules
        return getattr(mo.losses, name)(*args, backend=backend, **options, **extra).double()
    return make


@pytest.mark.parametrize("name,options,call", FUSED_OPTIONS,
                         ids=[f"{n}-{'-'.join(o) or 'clean'}" for n, o, _ in FUSED_OPTIONS])
def test_fused_cpu_paths_add_the_regularizer(name, options, call):
    x = torch.randn(14, 6, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5])  # even classes: "adjacent"
    _additive(_maker(name, "cpu", options, 6), x, y, reg.LpRegularizer(power=2), 0.7, **call)


@requires_triton
@pytest.mark.parametrize("name,options,call", FUSED_OPTIONS[:4],
                         ids=[f"{n}-{'-'.join(o)}" for n, o, _ in FUSED_OPTIONS[:4]])
def test_fused_triton_paths_add_the_regularizer(name, options, call):
    x = torch.randn(12, 5, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 4, 4])
    x, y = on_dev(x, y)
    make = _maker(name, "triton", options, 5)
    r = reg.ZeroMeanRegularizer()
    _additive(lambda **k: make(**k).to(DEVICE), x, y, r, 0.3, **call)


def test_functional_forms_take_the_options():
    x, y = make_case(CASES[1])
    r = reg.LpRegularizer()
    ours = mo.functional.multi_similarity_loss(x, y, embedding_regularizer=r,
                                               embedding_reg_weight=0.5)
    torch.testing.assert_close(ours, mo.functional.multi_similarity_loss(x, y) + 0.5 * r(x))
    P = torch.randn(C, x.shape[1], dtype=torch.float64)
    rf = reg.RegularFaceRegularizer()
    ours = mo.functional.proxy_anchor_loss(x, y, proxies=P, weight_regularizer=rf,
                                           weight_reg_weight=3.0)
    torch.testing.assert_close(ours, mo.functional.proxy_anchor_loss(x, y, proxies=P) + 3 * rf(P))


# ---- the wrappers -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["MultiSimilarityLoss", "ContrastiveLoss"])
@pytest.mark.parametrize("masked", [False, True])
def test_cross_batch_memory_regularizes_the_batch_rows_as_pml(name, masked):
    ours = mo.losses.CrossBatchMemory(
        getattr(mo.losses, name)(embedding_regularizer=reg.LpRegularizer(), backend="cpu"), 5,
        memory_size=20)
    theirs = pl.CrossBatchMemory(getattr(pl, name)(embedding_regularizer=preg.LpRegularizer()),
                                 5, memory_size=20).double()
    g = torch.Generator().manual_seed(2)
    for b in (8, 9, 7):
        x = torch.randn(b, 5, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (b,), generator=g)
        call = {"enqueue_mask": torch.arange(b) % 3 == 0} if masked else {}
        _assert_same(ours, theirs, x, y, **call)


# (DistributedLossWrapper: tests/distributed_cases.py's "ms-regularized" cases, against PML's
# wrapper in a two-process group, gathered and efficient)


def test_weights_of_other_number_types():
    """NumPy scalars (PML takes them) and one-element tensors, which may be learned: the
    weight's gradient is the regularizer's value."""
    import numpy as np
    x, y = make_case(CASES[0])
    r = reg.LpRegularizer()
    base = mo.losses.MultiSimilarityLoss()(x, y)
    out = mo.losses.MultiSimilarityLoss(embedding_regularizer=r,
                                        embedding_reg_weight=np.float32(0.5))(x, y)
    torch.testing.assert_close(out, base + 0.5 * r(x))
    w = torch.tensor(0.25, dtype=torch.float64, requires_grad=True)
    out = mo.losses.MultiSimilarityLoss(embedding_regularizer=r, embedding_reg_weight=w)(x, y)
    (gw,) = torch.autograd.grad(out, w)
    torch.testing.assert_close(gw, r(x).detach())


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("w", [torch.tensor([0.5]), torch.tensor([[0.5]]),
                               torch.tensor(0.5, dtype=torch.float64)], ids=["1", "1x1", "fp64"])
def test_a_tensor_weight_keeps_the_loss_a_scalar_of_its_dtype_as_pml(w, backend):
    x = torch.randn(11, 5, generator=torch.Generator().manual_seed(2))
    y = torch.arange(11) % 3
    ours = mo.losses.ContrastiveLoss(backend=backend, embedding_regularizer=reg.LpRegularizer(),
                                     embedding_reg_weight=w)(x, y)
    theirs = pl.ContrastiveLoss(embedding_regularizer=preg.LpRegularizer(),
                                embedding_reg_weight=w)(x, y)
    assert ours.shape == theirs.shape == () and ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs)


# ---- bad arguments ------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,err,msg", [
    ({"embedding_regularizer": "l2"}, TypeError, "embedding_regularizer must be a regularizer"),
    ({"embedding_regularizer": reg.LpRegularizer(), "embedding_reg_weight": float("nan")},
     ValueError, "embedding_reg_weight must be a finite real number"),
    ({"embedding_reg_weight": "1"}, ValueError, "embedding_reg_weight must be a finite"),
    ({"embedding_reg_weight": True}, ValueError, "embedding_reg_weight must be a finite"),
])
def test_bad_embedding_regularizer_arguments(kwargs, err, msg):
    with pytest.raises(err, match=msg):
        mo.losses.MultiSimilarityLoss(**kwargs)
    x, y = make_case(CASES[0])
    with pytest.raises(err, match=msg):
        mo.functional.multi_similarity_loss(x, y, **kwargs)


def test_bad_weight_regularizer_arguments():
    with pytest.raises(TypeError, match="weight_regularizer must be a regularizer"):
        mo.losses.ProxyAnchorLoss(3, 4, weight_regularizer=3)
    with pytest.raises(ValueError, match="weight_reg_weight must be a finite"):
        mo.losses.ProxyNCALoss(3, 4, weight_regularizer=reg.LpRegularizer(),
                               weight_reg_weight=float("inf"))
    with pytest.raises(TypeError, match="weight_init_func must be a callable"):
        mo.losses.ProxyNCALoss(3, 4, weight_init_func="normal")
    with pytest.raises(TypeError, match="unexpected arguments"):  # not a proxy loss
        mo.losses.MultiSimilarityLoss(weight_regularizer=reg.LpRegularizer())
    x, y = make_case(CASES[0])
    with pytest.raises(ValueError, match="weight_regularizer is for the proxy losses"):
        mo.functional.multi_similarity_loss(x, y, weight_regularizer=reg.LpRegularizer())


def test_bad_regularizer_outputs_and_inputs():
    x, y = make_case(CASES[0])
    loss = mo.losses.MultiSimilarityLoss(embedding_regularizer=lambda e: e.norm(dim=1))
    with pytest.raises(ValueError, match="embedding_regularizer must return a scalar tensor"):
        loss(x, y)
    with pytest.raises(ValueError, match="LpRegularizer takes a 2-D floating-point tensor"):
        reg.LpRegularizer()(torch.ones(3))
    with pytest.raises(ValueError, match="LpRegularizer takes a 2-D floating-point tensor"):
        reg.LpRegularizer()(torch.ones(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="distance must be the cosine similarity"):
        reg.RegularFaceRegularizer(distance=mo.distances.LpDistance())
    with pytest.raises(TypeError, match="reducer must be a reducer"):
        reg.LpRegularizer(reducer="mean")


def test_under_fullgraph_compile_equals_eager():
    loss = mo.losses.MultiSimilarityLoss(embedding_regularizer=reg.LpRegularizer(power=2),
                                         embedding_reg_weight=0.1, backend="cpu")
    x, y = make_case(CASES[1], dtype=torch.float32)
    compiled = torch.compile(lambda e, l: loss(e, l), fullgraph=True, dynamic=False)
    assert_close_vg(lambda e: compiled(e, y), lambda e: loss(e, y), x, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("p", [1, 2, 3])
def test_center_invariant_takes_pml_distance_option(p):
    from pytorch_metric_learning import distances as pd
    w = torch.randn(9, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(p))
    ours = reg.CenterInvariantRegularizer(
        distance=mo.distances.LpDistance(p=p, power=1, normalize_embeddings=False))
    theirs = preg.CenterInvariantRegularizer(
        distance=pd.LpDistance(p=p, power=1, normalize_embeddings=False))
    assert_close_vg(ours, theirs, w)
    # PML's other options are taken (a distance on the regularizers that use none)
    assert reg.LpRegularizer(distance=pd.LpDistance(), collect_stats=True)(w) == preg.LpRegularizer()(w)
    with pytest.raises(ValueError, match="distance must be an LpDistance with power=1"):
        reg.CenterInvariantRegularizer(distance=mo.distances.LpDistance())
