"""Every clean loss against PML 2.9: value and gradients (embeddings and proxies), float64
rtol 1e-6, over random odd shapes and the edge cases, with non-default hyper-parameters,
other distances, PML miners' indices_tuple and ref_emb/ref_labels."""
import pytest
import torch
from pytorch_metric_learning import distances as pd
from pytorch_metric_learning import losses as pl
from pytorch_metric_learning import miners as pm

import metrix_ops as mo
from cases import CASE_IDS, CASES, assert_close_vg, make_case

C = 11  # classes for proxy losses (labels in the cases are < 11)

# (loss name, hyper-parameter sets, distance constructors accepted by PML for it)
TABLE = [
    ("ContrastiveLoss", [{}, {"pos_margin": 0.2, "neg_margin": 0.7}], [None, pd.CosineSimilarity]),
    ("MultiSimilarityLoss", [{}, {"alpha": 1.3, "beta": 20.0, "base": 0.3}], [None, pd.LpDistance]),
    ("LiftedStructureLoss", [{}, {"neg_margin": 0.6, "pos_margin": 0.1}], [None, pd.CosineSimilarity]),
    ("GeneralizedLiftedStructureLoss", [{}, {"neg_margin": 0.4, "pos_margin": 0.2}], [None, pd.CosineSimilarity]),
    ("CircleLoss", [{}, {"m": 0.25, "gamma": 64.0}], [None]),
    ("NTXentLoss", [{}, {"temperature": 0.5}], [None, pd.LpDistance]),
    ("SupConLoss", [{}, {"temperature": 0.3}], [None, pd.LpDistance]),
    ("TripletMarginLoss", [{}, {"margin": 0.3, "swap": True}, {"margin": 0.2, "smooth_loss": True}],
     [None, pd.CosineSimilarity]),
    ("NPairsLoss", [{}], [None, pd.CosineSimilarity, pd.LpDistance]),
    ("ProxyAnchorLoss", [{}, {"margin": 0.2, "alpha": 16.0}], [None]),
    ("ProxyNCALoss", [{}, {"softmax_scale": 3.0}], [None, pd.CosineSimilarity]),
]
PROXY = {"ProxyAnchorLoss", "ProxyNCALoss"}
NO_REF = {"NPairsLoss"} | PROXY


def build(name, kw, dist=None, dim=None):
    extra = {} if dist is None else {"distance": dist()}
    if name in PROXY:
        pml = getattr(pl, name)(C, dim, **kw, **extra).double()
        ours = getattr(mo.losses, name)(C, dim, backend="reference", **kw, **extra).double()
        with torch.no_grad():
            ours.proxies.copy_(pml.proxies)
    else:
        pml = getattr(pl, name)(**kw, **extra)
        ours = getattr(mo.losses, name)(backend="reference", **kw, **extra)
    return ours, pml


def compare(ours, pml, x, y, **call):
    if hasattr(ours, "proxies"):
        def run(mod):
            def f(e, P):
                with torch.no_grad():
                    mod.proxies.copy_(P)
                # the proxies enter through a differentiable path: swap the parameter's data
                mod.proxies.grad = None
                out = mod(e, y, **call)
                return out
            return f
        # gradients w.r.t. proxies: compare .grad after backward
        vals, grads = [], []
        for mod in (ours, pml):
            e = x.detach().clone().requires_grad_(True)
            mod.proxies.grad = None
            out = mod(e, y, **call)
            out.backward()
            vals.append(out.detach())
            grads.append((e.grad.clone(), mod.proxies.grad.clone()))
        torch.testing.assert_close(vals[0], vals[1], rtol=1e-6, atol=1e-9)
        for a, b in zip(grads[0], grads[1]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
        return
    assert_close_vg(lambda e: ours(e, y, **call), lambda e: pml(e, y, **call), x)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("name,kws,dists", TABLE, ids=[t[0] for t in TABLE])
def test_clean_loss_matches_pml(name, kws, dists, case):
    x, y = make_case(case)
    for kw in kws:
        for dist in dists:
            ours, pml = build(name, kw, dist, x.shape[1])
            compare(ours, pml, x, y)


@pytest.mark.parametrize("name,kws,dists", TABLE, ids=[t[0] for t in TABLE])
def test_indices_tuple_from_pml_miners(name, kws, dists):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(19, 8, dtype=torch.float64, generator=g)
    y = torch.randint(0, 5, (19,), generator=g)
    for miner in (pm.MultiSimilarityMiner(), pm.TripletMarginMiner(margin=0.3),
                  pm.BatchHardMiner(), pm.TripletMarginMiner(margin=0.0, type_of_triplets="hard")):
        it = miner(x, y)
        ours, pml = build(name, kws[-1], None, 8)
        compare(ours, pml, x, y, indices_tuple=it)


@pytest.mark.parametrize("name,kws,dists", [t for t in TABLE if t[0] not in NO_REF],
                         ids=[t[0] for t in TABLE if t[0] not in NO_REF])
def test_ref_emb_matches_pml(name, kws, dists):
    g = torch.Generator().manual_seed(12)
    x = torch.randn(13, 6, dtype=torch.float64, generator=g)
    r = torch.randn(21, 6, dtype=torch.float64, generator=g)
    y, ry = torch.randint(0, 4, (13,), generator=g), torch.randint(0, 4, (21,), generator=g)
    for kw in kws:
        if kw.get("swap"):
            continue  # PML's swap indexes the query×reference matrix with reference indices
        ours, pml = build(name, kw)
        assert_close_vg(lambda e, f: ours(e, y, ref_emb=f, ref_labels=ry),
                        lambda e, f: pml(e, y, ref_emb=f, ref_labels=ry), x, r)
        # ref_labels *is* labels: PML then drops the diagonal too
        assert_close_vg(lambda e, f: ours(e, y, ref_emb=f, ref_labels=y),
                        lambda e, f: pml(e, y, ref_emb=f, ref_labels=y), x, r[:13])


@pytest.mark.parametrize("name", [t[0] for t in TABLE])
def test_gradcheck(name):
    x, y = make_case(CASES[2])  # B=5, D=3
    x = x + 0.01 * torch.arange(15, dtype=torch.float64).reshape(5, 3)  # away from kinks
    ours, _ = build(name, {}, None, x.shape[1])
    if name == "CircleLoss":  # its weights are detached: not the gradient of the value
        pytest.skip("CircleLoss uses detached weights by definition")
    assert torch.autograd.gradcheck(lambda e: ours(e, y), (x.detach().requires_grad_(),))


@pytest.mark.parametrize("name", [t[0] for t in TABLE])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_inputs(name, dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(24, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (24,), generator=g)
    ours, _ = build(name, {}, None, 16)
    ref = ours(x, y).detach()  # ProxyAnchor's proxies carry a gradient
    ours = ours.to(dtype)
    xl = x.to(dtype).requires_grad_(True)
    out = ours(xl, y)
    out.float().backward()
    assert torch.isfinite(out).all() and torch.isfinite(xl.grad).all()
    tol = {torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 1e-1}[dtype]
    assert abs(float(out.detach()) - float(ref)) <= tol * max(1.0, abs(float(ref)))


def test_large_exponents_are_stable():
    # near-duplicate classes: MS β=50 and ProxyAnchor α=32 overflow a naive exp in fp16/fp32
    g = torch.Generator().manual_seed(4)
    base = torch.randn(2, 32, generator=g, dtype=torch.float64)
    x = base.repeat_interleave(8, 0) + 1e-3 * torch.randn(16, 32, generator=g, dtype=torch.float64)
    y = torch.tensor([0] * 8 + [1] * 8)
    for name, kw in (("MultiSimilarityLoss", {"beta": 200.0}), ("ProxyAnchorLoss", {"alpha": 128.0})):
        ours, _ = build(name, kw, None, 32)
        ref = ours(x, y).detach()  # ProxyAnchor's proxies carry a gradient
        out = ours.float()(x.float(), y).detach()
        assert torch.isfinite(out) and abs(float(out) - float(ref)) <= 1e-3 * max(1, abs(float(ref)))


def test_proxy_nca_plus_plus_temperature_equals_scale():
    x, y = make_case(CASES[1])
    a = mo.losses.ProxyNCALoss(C, x.shape[1], temperature=0.25, backend="reference").double()
    b = mo.losses.ProxyNCALoss(C, x.shape[1], softmax_scale=4.0, backend="reference").double()
    with torch.no_grad():
        b.proxies.copy_(a.proxies)
    torch.testing.assert_close(a(x, y), b(x, y))


def test_proxy_label_range_is_checked():
    x = torch.randn(4, 5)
    with pytest.raises(ValueError, match=r"labels must be in \[0, num_classes=3\)"):
        mo.losses.ProxyAnchorLoss(3, 5, backend="reference")(x, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="proxies must be"):
        mo.functional.proxy_nca_loss(x, torch.tensor([0, 1, 2, 0]), backend="reference")


def test_functional_matches_modules():
    x, y = make_case(CASES[1])
    P = torch.randn(C, x.shape[1], dtype=torch.float64)
    pairs = [("multi_similarity_loss", "MultiSimilarityLoss", {"beta": 30.0}),
             ("triplet_margin_loss", "TripletMarginLoss", {"margin": 0.2}),
             ("supcon_loss", "SupConLoss", {}), ("proxy_anchor_loss", "ProxyAnchorLoss", {})]
    for fn, cls, kw in pairs:
        if cls in PROXY:
            mod = getattr(mo.losses, cls)(C, x.shape[1], backend="reference", **kw).double()
            with torch.no_grad():
                mod.proxies.copy_(P)
            kw = {**kw, "proxies": P}
        else:
            mod = getattr(mo.losses, cls)(backend="reference", **kw)
        torch.testing.assert_close(getattr(mo.functional, fn)(x, y, backend="reference", **kw), mod(x, y))


def test_random_triplets_per_anchor_are_valid():
    torch.manual_seed(0)
    x, y = make_case(CASES[1])
    from metrix_ops.reference.triplet_margin import random_triplets
    a, p, n = random_triplets(y, y, True, 3)
    assert len(a) > 0 and (y[a] == y[p]).all() and (y[a] != y[n]).all() and (a != p).all()
    counts = torch.bincount(a, minlength=len(y))
    assert set(counts.tolist()) <= {0, 3}
    loss = mo.losses.TripletMarginLoss(triplets_per_anchor=3, backend="reference")
    assert torch.isfinite(loss(x, y))
