"""ProxyNCALoss against PML 2.9: value and gradients w.r.t. embeddings *and* proxies
(float64, rtol 1e-6) on every case, softmax scales, distances (normalised or not), miner
tuples (PML's anchor-count weights), the dropped-underflow quirk, PML's proxy init; and
the ProxyNCA++ options (temperature, normalize_proxies) against PML-built equivalents."""
import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import distances as pd
from pytorch_metric_learning import losses as pl
from pytorch_metric_learning import miners as pm
from torch.func import functional_call

import metrix_ops as mo
from cases import CASE_IDS, CASES, assert_close_vg, make_case

C = 11  # number of classes: every label in CASES is < 11


def pml_proxies(dim, seed=0):
    torch.manual_seed(seed)
    return pl.ProxyNCALoss(C, dim).proxies.detach().double()


def ours_fn(y, dim=4, **kw):
    mod = mo.losses.ProxyNCALoss(C, dim, backend="reference", **kw)
    return lambda e, P, **call: functional_call(mod, {"proxies": P}, (e, y), call)


def pml_fn(y, dim=4, **kw):
    mod = pl.ProxyNCALoss(C, dim, **kw)
    return lambda e, P, **call: functional_call(mod, {"proxies": P}, (e, y), call)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("kw", [{}, {"softmax_scale": 3.0}, {"softmax_scale": 0.4}],
                         ids=["default", "scale3", "scale0.4"])
def test_matches_pml(case, kw):
    x, y = make_case(case)
    P = pml_proxies(x.shape[1])
    assert_close_vg(ours_fn(y, **kw), pml_fn(y, **kw), x, P)


@pytest.mark.parametrize("dist", [lambda: pd.CosineSimilarity(), lambda: pd.LpDistance(),
                                  lambda: pd.LpDistance(power=2, normalize_embeddings=False),
                                  lambda: pd.DotProductSimilarity(normalize_embeddings=False)],
                         ids=["cos", "lp", "lp_sq_raw", "dot_raw"])
def test_other_distances_match_pml(dist):
    for case in CASES[:3] + CASES[6:7]:
        x, y = make_case(case, seed=2)
        P = pml_proxies(x.shape[1], seed=2)
        assert_close_vg(ours_fn(y, distance=dist()), pml_fn(y, distance=dist()), x, P)


def test_underflowing_rows_are_dropped_as_pml():
    # a huge scale makes exp underflow to exactly 0 for rows whose own proxy is not the
    # nearest: PML drops those rows rather than returning inf
    x, y = make_case(CASES[1])
    P = pml_proxies(x.shape[1])
    scale = 3000.0
    d2 = torch.cdist(F.normalize(x.detach(), dim=1), F.normalize(P, dim=1)) ** 2
    prob = torch.softmax(-scale * d2, dim=1).gather(1, y[:, None]).squeeze(1)
    assert (prob == 0).any() and (prob != 0).any()  # the case really exercises the rule
    ours, pml = ours_fn(y, softmax_scale=scale), pml_fn(y, softmax_scale=scale)
    v = assert_close_vg(ours, pml, x, P)
    assert torch.isfinite(v)


def test_indices_tuple_weights_anchors_only_as_pml():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(19, 8, dtype=torch.float64, generator=g)
    y = torch.randint(0, 5, (19,), generator=g)
    P = pml_proxies(8)
    ours, pml = ours_fn(y, 8, softmax_scale=2.0), pml_fn(y, 8, softmax_scale=2.0)
    for miner in (pm.MultiSimilarityMiner(), pm.TripletMarginMiner(margin=0.3), pm.BatchHardMiner(),
                  pm.TripletMarginMiner(margin=0.0, type_of_triplets="hard")):
        it = miner(x, y)
        assert_close_vg(lambda e, Q: ours(e, Q, indices_tuple=it),
                        lambda e, Q: pml(e, Q, indices_tuple=it), x, P)
    # only the anchors count: an example that is only a positive/negative gets weight 0
    it = (torch.tensor([0, 0]), torch.tensor([1, 2]), torch.tensor([3, 4]))
    torch.testing.assert_close(ours(x, P, indices_tuple=it), pml(x, P, indices_tuple=it))
    per_row = -torch.log_softmax(-2.0 * torch.cdist(F.normalize(x, dim=1), F.normalize(P, dim=1)) ** 2, 1)
    torch.testing.assert_close(ours(x, P, indices_tuple=it), per_row[0, y[0]] / 19)


def test_ref_emb_is_rejected_like_pml():
    x, y = make_case(CASES[0])
    x = x.detach()
    for mod in (pl.ProxyNCALoss(C, x.shape[1]).double(),
                mo.losses.ProxyNCALoss(C, x.shape[1], backend="reference").double()):
        with pytest.raises(ValueError, match="ref_emb"):
            mod(x, y, ref_emb=x.clone(), ref_labels=y)


def test_proxy_init_is_pml_distribution():
    for seed in (0, 5):
        torch.manual_seed(seed)
        theirs = pl.ProxyNCALoss(9, 20).proxies.detach()
        torch.manual_seed(seed)
        ours = mo.losses.ProxyNCALoss(9, 20).proxies.detach()
        assert torch.equal(ours, theirs)


def test_temperature_is_a_logit_divisor():
    x, y = make_case(CASES[0])
    P = pml_proxies(x.shape[1])
    assert_close_vg(ours_fn(y, temperature=0.25), pml_fn(y, softmax_scale=4.0), x, P)
    assert_close_vg(ours_fn(y, softmax_scale=3.0, temperature=0.5), pml_fn(y, softmax_scale=6.0), x, P)
    with pytest.raises(ValueError, match="temperature"):
        ours_fn(y, temperature=0.0)(x, P)


def test_normalize_proxies_options():
    x, y = make_case(CASES[1])
    P = 3 * pml_proxies(x.shape[1])  # far from unit norm, so normalising matters
    raw = pd.LpDistance(power=2, normalize_embeddings=False)
    # None and True are PML's default: its distance already normalises the proxies
    assert_close_vg(ours_fn(y, normalize_proxies=True), pml_fn(y), x, P)
    assert_close_vg(ours_fn(y, normalize_proxies=None), pml_fn(y), x, P)
    # True under a distance that does not normalise: PML on pre-normalised proxies
    assert_close_vg(ours_fn(y, normalize_proxies=True, distance=raw),
                    lambda e, Q: pml_fn(y, distance=raw)(e, F.normalize(Q, dim=1)), x, P)
    # False under the default distance: unit embeddings, raw proxies
    assert_close_vg(ours_fn(y, normalize_proxies=False),
                    lambda e, Q: pml_fn(y, distance=raw)(F.normalize(e, dim=1), Q), x, P)
    a, b = ours_fn(y, normalize_proxies=False)(x, P), ours_fn(y)(x, P)
    assert not torch.allclose(a, b)  # the option does change the loss
    with pytest.raises(ValueError, match="normalize_proxies"):
        ours_fn(y, normalize_proxies="yes")(x, P)


def test_module_parameter_gets_pml_gradient():
    x, y = make_case(CASES[1])
    ours = mo.losses.ProxyNCALoss(C, x.shape[1], backend="reference").double()
    pml = pl.ProxyNCALoss(C, x.shape[1]).double()
    with torch.no_grad():
        ours.proxies.copy_(pml.proxies)
    grads = []
    for mod in (ours, pml):
        e = x.detach().clone().requires_grad_(True)
        out = mod(e, y)
        out.backward()
        grads.append((out.detach(), e.grad, mod.proxies.grad))
    assert grads[0][2].abs().sum() > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_functional_equals_module_and_gradcheck():
    x, y = make_case(CASES[2])  # B=5, D=3
    P = pml_proxies(3)
    mod = mo.losses.ProxyNCALoss(C, 3, softmax_scale=2.0, temperature=0.5, backend="reference").double()
    with torch.no_grad():
        mod.proxies.copy_(P)
    f = lambda e, Q: mo.functional.proxy_nca_loss(e, y, proxies=Q, softmax_scale=2.0,
                                                  temperature=0.5, backend="reference")
    torch.testing.assert_close(f(x, P), mod(x, y))
    assert torch.autograd.gradcheck(f, (x.detach().requires_grad_(), P.clone().requires_grad_()))
    g = lambda e, Q: mo.functional.proxy_nca_loss(e, y, proxies=Q, normalize_proxies=False,
                                                  backend="reference")
    assert torch.autograd.gradcheck(g, (x.detach().requires_grad_(), P.clone().requires_grad_()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(24, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (24,), generator=g)
    P = pml_proxies(16)
    f = ours_fn(y, 16, softmax_scale=8.0)
    ref = f(x, P)
    xl, Pl = x.to(dtype).requires_grad_(True), P.to(dtype).requires_grad_(True)
    out = f(xl, Pl)
    out.backward()
    assert out.dtype == torch.float32 and torch.isfinite(out)
    assert torch.isfinite(xl.grad).all() and torch.isfinite(Pl.grad).all()
    tol = {torch.float16: 2e-2, torch.bfloat16: 8e-2}[dtype]
    assert abs(float(out.detach()) - float(ref)) <= tol * max(1.0, abs(float(ref)))


def test_bad_inputs():
    x = torch.randn(4, 5)
    with pytest.raises(ValueError, match=r"labels must be in \[0, num_classes=3\)"):
        mo.losses.ProxyNCALoss(3, 5, backend="reference")(x, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="proxies must be"):
        mo.functional.proxy_nca_loss(x, torch.tensor([0, 1, 2, 0]), backend="reference")
