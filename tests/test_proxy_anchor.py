"""ProxyAnchorLoss against PML 2.9: value and gradients w.r.t. embeddings *and* proxies
(float64, rtol 1e-6) on every case, other hyper-parameters, distances, reducers and
miner tuples (PML's reweighting quirk), PML's proxy init, log-sum-exp stability."""
import pytest
import torch
from pytorch_metric_learning import distances as pd
from pytorch_metric_learning import losses as pl
from pytorch_metric_learning import miners as pm
from pytorch_metric_learning import reducers as pr
from torch.func import functional_call

import metrix_ops as mo
from cases import CASE_IDS, CASES, assert_close_vg, make_case

C = 11  # number of classes: every label in CASES is < 11


def pml_proxies(dim, seed=0):
    """Proxies drawn by PML's own init, in float64."""
    torch.manual_seed(seed)
    return pl.ProxyAnchorLoss(C, dim).proxies.detach().double()


def pair(kw=None, dim=4, **options):
    """(ours as f(e, P), PML as f(e, P)): both see the proxies as an input, so gradients
    w.r.t. the proxies are compared too (PML through functional_call on its module)."""
    kw = kw or {}
    ours = mo.losses.ProxyAnchorLoss(C, dim, backend="reference", **kw, **options)
    pml = pl.ProxyAnchorLoss(C, dim, **kw, **options)
    return ((lambda y, **call: lambda e, P: functional_call(ours, {"proxies": P}, (e, y), call)),
            (lambda y, **call: lambda e, P: functional_call(pml, {"proxies": P}, (e, y), call)))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("kw", [{}, {"margin": 0.25, "alpha": 16.0}, {"margin": 0.0, "alpha": 48}],
                         ids=["default", "m0.25_a16", "m0_a48"])
def test_matches_pml(case, kw):
    x, y = make_case(case)
    P = pml_proxies(x.shape[1])
    ours, pml = pair(kw, x.shape[1])
    assert_close_vg(ours(y), pml(y), x, P)


@pytest.mark.parametrize("dist", [lambda: pd.LpDistance(), lambda: pd.LpDistance(power=2),
                                  lambda: pd.DotProductSimilarity(normalize_embeddings=False)],
                         ids=["lp", "lp_sq", "dot_raw"])
def test_other_distances_match_pml(dist):
    # PML accepts any distance; with a distance `margin` flips the signs of the exponents
    for case in CASES[:3] + CASES[6:7]:
        x, y = make_case(case, seed=1)
        P = pml_proxies(x.shape[1], seed=1)
        kw = {"alpha": 4.0} if "Dot" in type(dist()).__name__ else {}  # raw dots are large
        ours, pml = pair(kw, x.shape[1], distance=dist())
        assert_close_vg(ours(y), pml(y), x, P)


def test_other_reducers_match_pml():
    x, y = make_case(CASES[1])
    P = pml_proxies(x.shape[1])
    for red in ("MeanReducer", "SumReducer", "AvgNonZeroReducer"):
        ours, pml = pair({"margin": 0.05}, x.shape[1], reducer=getattr(pr, red)())
        assert_close_vg(ours(y), pml(y), x, P)


def test_indices_tuple_reweights_as_pml():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(19, 8, dtype=torch.float64, generator=g)
    y = torch.randint(0, 5, (19,), generator=g)
    P = pml_proxies(8)
    ours, pml = pair({}, 8)
    plain = ours(y)(x, P)
    tuples = [m(x, y) for m in (pm.MultiSimilarityMiner(), pm.TripletMarginMiner(margin=0.3),
                                pm.BatchHardMiner(), pm.TripletMarginMiner(margin=0.0, type_of_triplets="hard"))]
    tuples.append(tuple(torch.empty(0, dtype=torch.long) for _ in range(3)))  # nothing mined
    for it in tuples:
        assert_close_vg(ours(y, indices_tuple=it), pml(y, indices_tuple=it), x, P)
    # the quirk itself: an example the miner never picks still counts, with factor e^{-1}
    it = (torch.tensor([0]), torch.tensor([1]), torch.tensor([2]))
    ours_it = ours(y, indices_tuple=it)(x, P)
    assert torch.isfinite(ours_it) and not torch.allclose(ours_it, plain)
    torch.testing.assert_close(ours(y, indices_tuple=tuples[-1])(x, P), plain)


def test_ref_emb_is_rejected_like_pml():
    x, y = make_case(CASES[0])
    x = x.detach()
    for mod in (pl.ProxyAnchorLoss(C, x.shape[1]).double(),
                mo.losses.ProxyAnchorLoss(C, x.shape[1], backend="reference").double()):
        with pytest.raises(ValueError, match="ref_emb"):
            mod(x, y, ref_emb=x.clone(), ref_labels=y)


def test_proxy_init_is_pml_distribution():
    # same RNG stream, same init function and shape: bit-identical proxies
    for seed in (0, 7):
        torch.manual_seed(seed)
        theirs = pl.ProxyAnchorLoss(13, 24).proxies.detach()
        torch.manual_seed(seed)
        ours = mo.losses.ProxyAnchorLoss(13, 24).proxies.detach()
        assert ours.dtype == theirs.dtype == torch.float32
        assert torch.equal(ours, theirs)
    assert isinstance(mo.losses.ProxyAnchorLoss(3, 4).proxies, torch.nn.Parameter)


def test_module_parameter_gets_pml_gradient():
    x, y = make_case(CASES[1])
    ours = mo.losses.ProxyAnchorLoss(C, x.shape[1], backend="reference").double()
    pml = pl.ProxyAnchorLoss(C, x.shape[1]).double()
    with torch.no_grad():
        ours.proxies.copy_(pml.proxies)
    grads = []
    for mod in (ours, pml):
        e = x.detach().clone().requires_grad_(True)
        out = mod(e, y)
        out.backward()
        grads.append((out.detach(), e.grad, mod.proxies.grad))
    assert grads[0][2].abs().sum() > 0  # the proxies really are in the graph
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_functional_equals_module_and_gradcheck():
    x, y = make_case(CASES[2])  # B=5, D=3
    P = pml_proxies(3)
    mod = mo.losses.ProxyAnchorLoss(C, 3, margin=0.2, backend="reference").double()
    with torch.no_grad():
        mod.proxies.copy_(P)
    f = lambda e, Q: mo.functional.proxy_anchor_loss(e, y, proxies=Q, margin=0.2, backend="reference")
    torch.testing.assert_close(f(x, P), mod(x, y))
    assert torch.autograd.gradcheck(f, (x.detach().requires_grad_(), P.clone().requires_grad_()))


def test_log_sum_exp_is_stable_where_naive_exp_overflows():
    # raw dot products: α·(s + δ) reaches ~10³, far past fp32's e^88.7
    g = torch.Generator().manual_seed(4)
    x = 6 * torch.randn(16, 32, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (16,), generator=g)
    P = 6 * torch.randn(C, 32, generator=g, dtype=torch.float64)
    dist = dict(distance=pd.DotProductSimilarity(normalize_embeddings=False))
    s32 = x.float() @ P.float().t()
    assert torch.isinf(torch.exp(32 * (s32 + 0.1))).any()  # what a naive form would do
    ours, pml = pair({}, 32, **dist)
    ref = ours(y)(x, P)
    torch.testing.assert_close(ref, pml(y)(x, P))  # PML (float64) agrees
    x32, P32 = x.float().requires_grad_(True), P.float().requires_grad_(True)
    out = ours(y)(x32, P32)
    out.backward()
    assert out.dtype == torch.float32 and torch.isfinite(out)
    assert torch.isfinite(x32.grad).all() and torch.isfinite(P32.grad).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)
    # and the default cosine at α = 32 in fp32 matches float64 closely
    ours, _ = pair({}, 32)
    torch.testing.assert_close(ours(y)(x.float(), P.float()).double(), ours(y)(x, P), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(24, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (24,), generator=g)
    P = pml_proxies(16)
    ours, _ = pair({}, 16)
    ref = ours(y)(x, P)
    xl, Pl = x.to(dtype).requires_grad_(True), P.to(dtype).requires_grad_(True)
    out = ours(y)(xl, Pl)
    out.backward()
    assert out.dtype == torch.float32  # half inputs are computed and returned in fp32
    assert torch.isfinite(xl.grad).all() and torch.isfinite(Pl.grad).all()
    assert xl.grad.dtype == dtype and Pl.grad.dtype == dtype
    tol = {torch.float16: 2e-2, torch.bfloat16: 8e-2}[dtype]
    assert abs(float(out.detach()) - float(ref)) <= tol * max(1.0, abs(float(ref)))


def test_bad_proxies_and_labels():
    x = torch.randn(4, 5)
    with pytest.raises(ValueError, match=r"labels must be in \[0, num_classes=3\)"):
        mo.losses.ProxyAnchorLoss(3, 5, backend="reference")(x, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="proxies must be"):
        mo.functional.proxy_anchor_loss(x, torch.tensor([0, 1, 2, 0]), backend="reference")
    with pytest.raises(ValueError, match="proxies must be"):
        mo.functional.proxy_anchor_loss(x, torch.tensor([0, 1, 2, 0]), proxies=torch.randn(3, 4))
    with pytest.raises(ValueError, match="labels"):  # an indices_tuple does not replace labels
        it = (torch.tensor([0]), torch.tensor([1]), torch.tensor([2]))
        mo.losses.ProxyAnchorLoss(3, 5, backend="reference")(x, None, it)
    with pytest.raises(ValueError, match="num_classes"):
        mo.losses.ProxyAnchorLoss(0, 5)
