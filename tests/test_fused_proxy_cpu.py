"""The fused CPU proxy-anchor op against the reference and PML: values and gradients
w.r.t. embeddings and proxies over odd shapes and proxy-chunk sizes, edge cases (absent
classes, one class, duplicates, large α), reducers, dtypes; bad input, opcheck, backend."""
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pl
from torch.func import functional_call

import metrix_ops as mo
import metrix_ops.ops.proxy_anchor as pa_ops
import metrix_ops.ops.proxy_nca as nca_ops
from cases import assert_close_vg, value_and_grad
from metrix_ops import _ext

pytestmark = pytest.mark.skipif(not _ext.HAS_EXT, reason="extension not built")


def module_fn(name, C, D, backend, **kw):
    """f(y) -> (e, P) -> loss, the proxies an input so their gradient is compared too."""
    mod = getattr(mo.losses, name)(C, D, backend=backend, **kw)
    return lambda y, **call: lambda e, P: functional_call(mod, {"proxies": P}, (e, y), call)


def pml_module_fn(name, C, D, **kw):
    mod = getattr(pl, name)(C, D, **kw)
    return lambda y: lambda e, P: functional_call(mod, {"proxies": P}, (e, y))


loss_fn, pml_fn = partial(module_fn, "ProxyAnchorLoss"), partial(pml_module_fn, "ProxyAnchorLoss")
nca_fn, nca_pml = partial(module_fn, "ProxyNCALoss"), partial(pml_module_fn, "ProxyNCALoss")


@pytest.fixture
def chunk(request, monkeypatch):
    """Rows per tile of the fused ops (proxies for ProxyAnchor, examples for ProxyNCA);
    None: the ops' default."""
    if request.param is not None:
        monkeypatch.setattr(pa_ops, "default_chunk", lambda n: request.param)
        monkeypatch.setattr(nca_ops, "default_chunk", lambda n: request.param)
    return request.param


def data(B, C, D, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=torch.float64).to(dtype)
    P = torch.randn(C, D, generator=g, dtype=torch.float64).to(dtype)
    return x, torch.randint(0, C, (B,), generator=g), P


@pytest.mark.parametrize("chunk", [1, 4, None], indirect=True)
@pytest.mark.parametrize("C", [1, 5, 101])
@pytest.mark.parametrize("B,D", [(1, 3), (3, 17), (37, 64), (300, 17), (37, 3), (300, 64)])
def test_matches_reference_and_pml_fp64(B, C, D, chunk):
    x, y, P = data(B, C, D, seed=B * 1000 + C)
    fused = loss_fn(C, D, "cpu")(y)
    v = assert_close_vg(fused, loss_fn(C, D, "reference")(y), x, P)
    assert_close_vg(fused, pml_fn(C, D)(y), x, P)
    assert torch.isfinite(v) and v > 0


@pytest.mark.parametrize("kw", [{"margin": 0.25, "alpha": 16.0}, {"margin": 0.0, "alpha": 48.0},
                                {"margin": -0.1, "alpha": 2.0}])
def test_hyper_parameters(kw):
    x, y, P = data(41, 7, 9, seed=3)
    assert_close_vg(loss_fn(7, 9, "cpu", **kw)(y), pml_fn(7, 9, **kw)(y), x, P)


@pytest.mark.parametrize("chunk", [2], indirect=True)
def test_edge_cases(chunk):
    D, C = 6, 5
    x, _, P = data(12, C, D, seed=5)
    labels = {
        "absent_classes": torch.tensor([0, 1, 1, 3, 0, 3, 1, 0, 0, 3, 1, 1]),  # no 2, no 4
        "one_class": torch.full((12,), 4),
        "all_distinct": torch.arange(12) % C,
    }
    for name, y in labels.items():
        fused = loss_fn(C, D, "cpu")(y)
        assert_close_vg(fused, loss_fn(C, D, "reference")(y), x, P)
        assert_close_vg(fused, pml_fn(C, D)(y), x, P)
    # a proxy with no example has no positive term; its negative term still has a gradient
    y = labels["absent_classes"]
    pos, neg = pa_ops.proxy_anchor_terms(F.normalize(x, dim=1), F.normalize(P, dim=1), y, 32.0, 0.1, 2)
    assert pos[2] == 0 and pos[4] == 0 and (pos[[0, 1, 3]] > 0).all() and (neg > 0).all()
    _, (gx, gP) = value_and_grad(loss_fn(C, D, "cpu")(y), x, P)
    assert gP[2].abs().sum() > 0


def test_duplicate_embeddings():
    x, y, P = data(10, 4, 8, seed=6)
    x[1], x[5], x[6] = x[0], x[3], x[3]
    y[1] = y[0]
    y[5] = (y[3] + 1) % 4  # a duplicate that is a negative for the other's proxy
    P[2] = P[1]  # duplicate proxies too
    assert_close_vg(loss_fn(4, 8, "cpu")(y), pml_fn(4, 8)(y), x, P)


@pytest.mark.parametrize("alpha", [32.0, 64.0, 100.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_alpha_near_identical_vectors(alpha, dtype):
    # every similarity ≈ 1: α(s + δ) ≈ 1.1α, past fp16's e^11 at α ≥ 32, fp32's e^88.7 at 100
    g = torch.Generator().manual_seed(7)
    base = torch.randn(1, 32, generator=g, dtype=torch.float64)
    x = base + 1e-4 * torch.randn(64, 32, generator=g, dtype=torch.float64)
    P = base + 1e-4 * torch.randn(3, 32, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (64,), generator=g)
    s = F.normalize(x, dim=1) @ F.normalize(P, dim=1).t()
    naive = torch.exp(alpha * (s + 0.1)).sum(0)  # what a naive form would do
    assert torch.isinf(naive.half()).all() and (alpha < 90 or torch.isinf(naive.float()).all())
    v, (gx, gP) = value_and_grad(loss_fn(3, 32, "cpu", alpha=alpha)(y), x.to(dtype), P.to(dtype))
    assert torch.isfinite(v) and torch.isfinite(gx).all() and torch.isfinite(gP).all()
    vr, (gxr, gPr) = value_and_grad(loss_fn(3, 32, "reference", alpha=alpha)(y), x, P)
    rtol = 1e-6 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(v.double(), vr, rtol=rtol, atol=0)
    # gradients: near-identical inputs make them cancel to tiny values; scale by their size.
    # fp32 cannot resolve 1 − s ≈ 1e-8 (its eps is 6e-8), so its bound is looser
    gtol = 1e-6 if dtype == torch.float64 else 5e-3
    for a, b in ((gx, gxr), (gP, gPr)):
        assert b.abs().max() > 0
        torch.testing.assert_close(a.double(), b, rtol=0, atol=gtol * b.abs().max())


def test_fp32_matches_fp64_reference():
    x, y, P = data(300, 101, 64, seed=8)
    v, (gx, gP) = value_and_grad(loss_fn(101, 64, "cpu")(y), x.float(), P.float())
    vr, (gxr, gPr) = value_and_grad(loss_fn(101, 64, "reference")(y), x, P)
    assert v.dtype == gx.dtype == gP.dtype == torch.float32
    torch.testing.assert_close(v.double(), vr, rtol=1e-4, atol=0)
    for a, b in ((gx, gxr), (gP, gPr)):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4 * b.abs().max())


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_half_inputs(dtype, tol):
    x, y, P = data(40, 6, 16, seed=9)
    xl, Pl = x.to(dtype).requires_grad_(True), P.to(dtype).requires_grad_(True)
    out = loss_fn(6, 16, "cpu")(y)(xl, Pl)
    out.backward()
    assert out.dtype == torch.float32 and torch.isfinite(out)
    assert xl.grad.dtype == Pl.grad.dtype == dtype
    assert torch.isfinite(xl.grad).all() and torch.isfinite(Pl.grad).all()
    ref32 = loss_fn(6, 16, "reference")(y)(xl.detach().float(), Pl.detach().float())
    torch.testing.assert_close(out.detach(), ref32, rtol=1e-5, atol=1e-6)  # same fp32 inputs
    ref64 = loss_fn(6, 16, "reference")(y)(x, P)
    assert abs(float(out.detach()) - float(ref64)) <= tol * abs(float(ref64))


@pytest.mark.parametrize("red", ["MeanReducer", "SumReducer", "AvgNonZeroReducer"])
def test_other_reducers_match_pml(red):
    from pytorch_metric_learning import reducers as pr
    x, y, P = data(23, 9, 5, seed=10)
    y[y == 4] = 3  # a class with no example: its pos term is a zero AvgNonZero skips
    fused = loss_fn(9, 5, "cpu", reducer=getattr(mo.reducers, red)())(y)
    assert_close_vg(fused, pml_fn(9, 5, reducer=getattr(pr, red)())(y), x, P)
    thr = mo.reducers.ThresholdReducer(low=0.5, high=4.0)
    assert_close_vg(loss_fn(9, 5, "cpu", reducer=thr)(y), loss_fn(9, 5, "reference", reducer=thr)(y), x, P)


def test_module_parameter_and_functional():
    x, y, P = data(17, 4, 8, seed=11)
    grads = []
    for backend in ("cpu", "reference"):
        mod = mo.losses.ProxyAnchorLoss(4, 8, backend=backend)  # fp32 parameter, fp64 inputs
        with torch.no_grad():
            mod.proxies.copy_(P)
        e = x.clone().requires_grad_(True)
        out = mod(e, y)
        out.backward()
        assert mod.proxies.grad.dtype == torch.float32
        grads.append((out.detach(), e.grad, mod.proxies.grad))
    assert grads[0][2].abs().sum() > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    f = mo.functional.proxy_anchor_loss(x, y, proxies=P, backend="cpu")
    torch.testing.assert_close(f, mo.functional.proxy_anchor_loss(x, y, proxies=P, backend="reference"))


def test_op_chunks_and_gradcheck():
    x, y, P = data(13, 7, 5, seed=12)
    xu, pu = F.normalize(x, dim=1), F.normalize(P, dim=1)
    full = pa_ops.proxy_anchor_terms(xu, pu, y, 32.0, 0.1, 7)
    for c in (1, 2, 3, 6, 100):
        for a, b in zip(pa_ops.proxy_anchor_terms(xu, pu, y, 32.0, 0.1, c), full):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    w = torch.randn(2, 7, dtype=torch.float64)  # unequal weights for both outputs

    def f(e, p):
        pos, neg = pa_ops.proxy_anchor_terms(e, p, y, 4.0, 0.1, 3)
        return (pos * w[0]).sum() + (neg * w[1]).sum()

    assert torch.autograd.gradcheck(f, (xu.clone().requires_grad_(), pu.clone().requires_grad_()))

    def f_pos(e, p):  # only one output used: the other's gradient arrives as None
        return pa_ops.proxy_anchor_terms(e, p, y, 4.0, 0.1, 3)[0].sum()

    assert torch.autograd.gradcheck(f_pos, (xu.clone().requires_grad_(), pu.clone().requires_grad_()))


def test_opcheck():
    x, y, P = data(9, 4, 5, seed=13, dtype=torch.float32)
    args = (F.normalize(x, dim=1).requires_grad_(), F.normalize(P, dim=1).requires_grad_(),
            y, 32.0, 0.1, 3)
    torch.library.opcheck(torch.ops.metrix_ops.proxy_anchor_fwd.default, args)


@pytest.mark.parametrize("B,C,D,chunk", [(1, 1, 3, 1), (37, 5, 17, 2), (200, 31, 9, 7)])
def test_gradient_from_the_forward_parts(B, C, D, chunk):
    """proxy_anchor_grad_fwd's parts give the recomputing backward's dx and dp: per-proxy
    grad_pos of any values (applied to the kept positive weights), grad_neg one value (the
    stored products, scaled) or not (then it recomputes); a class with no example included."""
    x, y, P = data(B, C, D, seed=B + C)
    y = torch.where(y == C - 1, 0, y) if C > 1 else y  # proxy C − 1 has no positive
    xu, pu = F.normalize(x, dim=1), F.normalize(P, dim=1)
    ops = torch.ops.metrix_ops
    pos, neg, w, dxn, dpn = ops.proxy_anchor_grad_fwd(xu, pu, y, 32.0, 0.1, chunk)
    pos0, neg0 = ops.proxy_anchor_fwd(xu, pu, y, 32.0, 0.1, chunk)
    torch.testing.assert_close((pos, neg), (pos0, neg0), rtol=0, atol=0)
    g = torch.Generator().manual_seed(3)
    g_pos = torch.rand(C, dtype=torch.float64, generator=g)
    for g_neg in (torch.full((C,), 0.7, dtype=torch.float64),
                  torch.rand(C, dtype=torch.float64, generator=g)):
        got = ops.proxy_anchor_grad_bwd(g_pos, g_neg, xu, pu, y, pos, neg, w, dxn, dpn, 32.0,
                                        0.1, chunk)
        want = ops.proxy_anchor_bwd(g_pos, g_neg, xu, pu, y, pos, neg, 32.0, 0.1, chunk)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", [nca_ops.COSINE, nca_ops.SQUARED_L2])
@pytest.mark.parametrize("B,C,D,chunk", [(1, 1, 3, 1), (37, 5, 17, 4), (200, 31, 9, 7)])
def test_nca_gradient_from_the_forward(B, C, D, chunk, kind):
    """proxy_nca_grad_fwd's gradient at unit upstream gradient gives the recomputing
    backward's dx and dp: scaled when grad_rows is one value, recomputed when it is not."""
    x, y, P = data(B, C, D, seed=7 * B + C)
    xu, pu = F.normalize(x, dim=1), F.normalize(P, dim=1)
    ops = torch.ops.metrix_ops
    rows, lse, dx1, dp1 = ops.proxy_nca_grad_fwd(xu, pu, y, 9.0, kind, chunk)
    torch.testing.assert_close((rows, lse), ops.proxy_nca_fwd(xu, pu, y, 9.0, kind, chunk),
                               rtol=0, atol=0)
    g = torch.Generator().manual_seed(5)
    for g_rows in (torch.full((B,), 0.3, dtype=torch.float64),
                   torch.rand(B, dtype=torch.float64, generator=g)):
        got = ops.proxy_nca_grad_bwd(g_rows, xu, pu, y, lse, dx1, dp1, 9.0, kind, chunk)
        want = ops.proxy_nca_bwd(g_rows, xu, pu, y, lse, 9.0, kind, chunk)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_nca_module_forms_the_gradient_in_its_forward_only_when_wanted():
    x, y, P = data(20, 4, 6, seed=9, dtype=torch.float32)
    xu, pu = F.normalize(x, dim=1), F.normalize(P, dim=1).requires_grad_()
    rows = nca_ops.proxy_nca_rows(xu, pu, y, 9.0, nca_ops.COSINE)
    assert "proxy_nca_grad_fwd" in rows.grad_fn.name()
    with torch.no_grad():
        torch.testing.assert_close(nca_ops.proxy_nca_rows(xu, pu, y, 9.0, nca_ops.COSINE),
                                   rows.detach(), rtol=0, atol=0)
    assert nca_ops.proxy_nca_rows(xu, pu.detach(), y, 9.0, nca_ops.COSINE).grad_fn is None
    args = (xu.requires_grad_(), pu.detach().requires_grad_(), y, 9.0, nca_ops.COSINE, 3)
    torch.library.opcheck(torch.ops.metrix_ops.proxy_nca_grad_fwd.default, args)
    _, lse, dx1, dp1 = torch.ops.metrix_ops.proxy_nca_grad_fwd(*args)
    for g_rows in (torch.full((20,), 0.05), torch.rand(20)):
        torch.library.opcheck(torch.ops.metrix_ops.proxy_nca_grad_bwd.default,
                              (g_rows, xu.detach(), pu.detach(), y, lse, dx1, dp1, 9.0,
                               nca_ops.COSINE, 3))


def test_module_forms_the_gradient_in_its_forward_only_when_wanted():
    x, y, P = data(20, 4, 6, seed=4, dtype=torch.float32)
    xu, pu = F.normalize(x, dim=1), F.normalize(P, dim=1)
    pos, _ = pa_ops.proxy_anchor_terms(xu.requires_grad_(), pu, y, 32.0, 0.1)
    assert "proxy_anchor_grad_fwd" in pos.grad_fn.name()
    with torch.no_grad():
        assert torch.equal(pa_ops.proxy_anchor_terms(xu, pu, y, 32.0, 0.1)[0], pos.detach())
    pos2, _ = pa_ops.proxy_anchor_terms(xu.detach(), pu, y, 32.0, 0.1)
    assert pos2.grad_fn is None


def test_opcheck_gradient_ops():
    x, y, P = data(9, 4, 5, seed=14, dtype=torch.float32)
    args = (F.normalize(x, dim=1).requires_grad_(), F.normalize(P, dim=1).requires_grad_(),
            y, 32.0, 0.1, 3)
    torch.library.opcheck(torch.ops.metrix_ops.proxy_anchor_grad_fwd.default, args)
    pos, neg, w, dxn, dpn = torch.ops.metrix_ops.proxy_anchor_grad_fwd(*args)
    xd, pd = args[0].detach(), args[1].detach()
    for g_neg in (torch.full((4,), 0.25), torch.rand(4)):
        torch.library.opcheck(torch.ops.metrix_ops.proxy_anchor_grad_bwd.default,
                              (torch.rand(4), g_neg, xd, pd, y, pos, neg, w, dxn, dpn, 32.0,
                               0.1, 3))


def test_auto_picks_cpu(monkeypatch):
    import metrix_ops.fused as fused
    assert mo.backend.resolve("auto", "ProxyAnchorLoss", torch.device("cpu")) == "cpu"
    calls = []
    supports, impl = fused.IMPLS[("cpu", "ProxyAnchorLoss")]
    monkeypatch.setitem(fused.IMPLS, ("cpu", "ProxyAnchorLoss"),
                        (supports, lambda *a, **k: calls.append(1) or impl(*a, **k)))
    x, y, P = data(8, 3, 4, seed=14)
    out = loss_fn(3, 4, "auto")(y)(x, P)
    assert calls == [1]
    torch.testing.assert_close(out, loss_fn(3, 4, "reference")(y)(x, P))


def test_falls_back_or_refuses_outside_its_scope():
    from pytorch_metric_learning import distances as pd
    x, y, P = data(15, 4, 6, seed=15)
    lp = dict(distance=pd.LpDistance())
    with pytest.raises(NotImplementedError, match="does not cover this ProxyAnchorLoss call"):
        loss_fn(4, 6, "cpu", **lp)(y)(x, P)
    torch.testing.assert_close(loss_fn(4, 6, "auto", **lp)(y)(x, P), loss_fn(4, 6, "reference", **lp)(y)(x, P))


def test_bad_input_raises_clearly():
    x, y, P = data(6, 3, 4, seed=16, dtype=torch.float32)
    op = torch.ops.metrix_ops.proxy_anchor_fwd
    with pytest.raises(RuntimeError, match=r"labels must be in \[0, num_classes=3\)"):
        op(x, P, torch.tensor([0, 1, 2, 3, 0, 1]), 32.0, 0.1, 2)
    with pytest.raises(RuntimeError, match=r"labels must be in \[0, num_classes=3\)"):
        op(x, P, torch.tensor([0, 1, 2, -1, 0, 1]), 32.0, 0.1, 2)
    with pytest.raises(RuntimeError, match="same dtype"):
        op(x, P.double(), y, 32.0, 0.1, 2)
    with pytest.raises(RuntimeError, match="same D"):
        op(x, P[:, :3], y, 32.0, 0.1, 2)
    with pytest.raises(RuntimeError, match="2-D"):
        op(x[0], P, y, 32.0, 0.1, 2)
    with pytest.raises(RuntimeError, match="proxies must be 2-D"):
        op(x, P[0], y, 32.0, 0.1, 2)
    with pytest.raises(RuntimeError, match="labels must be int64"):
        op(x, P, y.int(), 32.0, 0.1, 2)
    with pytest.raises(RuntimeError, match="chunk must be > 0"):
        op(x, P, y, 32.0, 0.1, 0)
    with pytest.raises(RuntimeError, match=r"grad_pos must be of shape \(3,\)"):
        torch.ops.metrix_ops.proxy_anchor_bwd(torch.ones(2), torch.ones(3), x, P, y, torch.ones(3),
                                              torch.ones(3), 32.0, 0.1, 2)
    # through the module: the reference's own messages
    with pytest.raises(ValueError, match=r"labels must be in \[0, num_classes=3\)"):
        mo.losses.ProxyAnchorLoss(3, 4, backend="cpu")(x, torch.tensor([0, 1, 2, 3, 0, 1]))
    with pytest.raises(ValueError, match="proxies must be"):
        mo.functional.proxy_anchor_loss(x, y, proxies=torch.randn(3, 5), backend="cpu")


# ---------------------------------------------------------------- ProxyNCALoss

@pytest.mark.parametrize("chunk", [1, 4, None], indirect=True)
@pytest.mark.parametrize("C", [1, 5, 101])
@pytest.mark.parametrize("B,D", [(1, 3), (3, 17), (37, 64), (300, 17)])
def test_nca_matches_reference_and_pml_fp64(B, C, D, chunk):
    x, y, P = data(B, C, D, seed=B * 1000 + C + 1)
    fused = nca_fn(C, D, "cpu", softmax_scale=3.0)(y)
    v = assert_close_vg(fused, nca_fn(C, D, "reference", softmax_scale=3.0)(y), x, P)
    assert_close_vg(fused, nca_pml(C, D, softmax_scale=3.0)(y), x, P)
    assert torch.isfinite(v) and (C == 1 or v > 0)


@pytest.mark.parametrize("kw,pml_kw", [
    ({}, {}),
    ({"temperature": 0.1}, {"softmax_scale": 10.0}),  # ProxyNCA++: the logits over T
    ({"softmax_scale": 2.0, "temperature": 0.5, "normalize_proxies": True}, {"softmax_scale": 4.0}),
    ({"softmax_scale": 16.0, "distance": "cos"}, {"softmax_scale": 16.0, "distance": "cos"}),
])
def test_nca_options_match_pml(kw, pml_kw):
    from pytorch_metric_learning import distances as pd
    kw, pml_kw = dict(kw), dict(pml_kw)
    if kw.get("distance") == "cos":
        kw["distance"], pml_kw["distance"] = mo.distances.CosineSimilarity(), pd.CosineSimilarity()
    x, y, P = data(41, 7, 9, seed=21)
    P = 3 * P  # far from unit norm: the op must see normalised proxies
    y[y == 2] = 0  # a class with no example
    x[4] = x[3]  # duplicates
    assert_close_vg(nca_fn(7, 9, "cpu", **kw)(y), nca_pml(7, 9, **pml_kw)(y), x, P)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nca_underflow_rows_dropped_as_pml(dtype):
    x, y, P = data(31, 6, 16, seed=22, dtype=dtype)
    scale = 3000.0 if dtype == torch.float64 else 400.0
    d2 = torch.cdist(F.normalize(x, dim=1), F.normalize(P, dim=1)) ** 2
    prob = torch.softmax(-scale * d2, dim=1).gather(1, y[:, None]).squeeze(1)
    assert (prob == 0).any() and (prob != 0).any()  # the case really exercises the rule
    v, g = value_and_grad(nca_fn(6, 16, "cpu", softmax_scale=scale)(y), x, P)
    vr, gr = value_and_grad(nca_fn(6, 16, "reference", softmax_scale=scale)(y), x, P)
    assert torch.isfinite(v)
    rtol = 1e-6 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(v, vr, rtol=rtol, atol=0)
    for a, b in zip(g, gr):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * b.abs().max())


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_nca_half_inputs(dtype, tol):
    x, y, P = data(40, 6, 16, seed=23)
    xl, Pl = x.to(dtype).requires_grad_(True), P.to(dtype).requires_grad_(True)
    out = nca_fn(6, 16, "cpu", softmax_scale=8.0)(y)(xl, Pl)
    out.backward()
    assert out.dtype == torch.float32 and torch.isfinite(out)
    assert torch.isfinite(xl.grad).all() and torch.isfinite(Pl.grad).all()
    ref32 = nca_fn(6, 16, "reference", softmax_scale=8.0)(y)(xl.detach().float(), Pl.detach().float())
    torch.testing.assert_close(out.detach(), ref32, rtol=1e-5, atol=1e-6)


def test_nca_opcheck_and_auto():
    x, y, P = data(9, 4, 5, seed=24, dtype=torch.float32)
    args = (F.normalize(x, dim=1).requires_grad_(), F.normalize(P, dim=1).requires_grad_(),
            y, 2.0, 1, 3)
    torch.library.opcheck(torch.ops.metrix_ops.proxy_nca_fwd.default, args)
    assert mo.backend.resolve("auto", "ProxyNCALoss", torch.device("cpu")) == "cpu"


def test_nca_falls_back_or_refuses_outside_its_scope():
    from pytorch_metric_learning import distances as pd
    x, y, P = data(15, 4, 6, seed=25)
    it = mo.miners.MultiSimilarityMiner()(x, y)
    torch.testing.assert_close(nca_fn(4, 6, "auto")(y, indices_tuple=it)(x, P),
                               nca_fn(4, 6, "reference")(y, indices_tuple=it)(x, P))
    for kw in ({"normalize_proxies": False}, {"distance": pd.LpDistance()}):
        torch.testing.assert_close(nca_fn(4, 6, "auto", **kw)(y)(x, P),
                                   nca_fn(4, 6, "reference", **kw)(y)(x, P))
        with pytest.raises(NotImplementedError, match="does not cover this ProxyNCALoss call"):
            nca_fn(4, 6, "cpu", **kw)(y)(x, P)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        nca_fn(4, 6, "cpu", temperature=0.0)(y)(x, P)
    with pytest.raises(RuntimeError, match="kind must be 0 or 1"):
        torch.ops.metrix_ops.proxy_nca_fwd(x, P, y, 1.0, 2, 4)
    with pytest.raises(RuntimeError, match=r"labels must be in \[0, num_classes=4\)"):
        torch.ops.metrix_ops.proxy_nca_fwd(x, P, y + 1, 1.0, 1, 4)


@pytest.mark.parametrize("scale", [30.0, 60.0])
def test_nca_confident_rows_count_as_pml_in_fp32(scale):
    """AvgNonZero counts the rows with loss > 0. A row whose own proxy holds nearly all of the
    softmax is −log p with p just below 1 in PML: > 0 unless p rounds to 1. The op's row is
    (max − own) + log Σ, so it is 0 exactly then too; as lse − own (its form before) it also
    rounded to 0 whenever the other proxies' mass was below half an ulp of the logits, and
    the fp32 mean ran over fewer rows than PML's (11.80 against 11.07 in one case)."""
    from pytorch_metric_learning import reducers as pr
    x, y, P = confident_nca_case()
    C, D = P.shape
    d2 = torch.cdist(F.normalize(x, dim=1), F.normalize(P, dim=1)) ** 2
    pml_rows = -torch.log(torch.softmax(-scale * d2, 1).gather(1, y[:, None]).squeeze(1))
    # rows PML gives as 0 and rows it counts although they are below 1e-5
    assert (pml_rows == 0).any() and ((pml_rows > 0) & (pml_rows < 1e-5)).any()
    rows = nca_rows_cpu(x, y, P, scale)
    assert torch.equal(rows == 0, pml_rows == 0)
    kw = {"softmax_scale": scale}
    ours = module_fn("ProxyNCALoss", C, D, "cpu", reducer=mo.reducers.AvgNonZeroReducer(), **kw)
    pml = pml_module_fn("ProxyNCALoss", C, D, reducer=pr.AvgNonZeroReducer(), **kw)
    assert_close_vg(ours(y), pml(y), x, P, rtol=1e-4, atol=1e-4)


def confident_nca_case(C=4, D=16, B=40):
    """fp32 (x, y, P), the examples at spreads from 0.003 to 3 around their own proxy:
    confident rows and others"""
    g = torch.Generator().manual_seed(0)
    P = torch.randn(C, D, generator=g)
    y = torch.arange(B) % C
    spread = torch.logspace(-2.5, 0.5, B)[torch.randperm(B, generator=g)]
    x = F.normalize(P, dim=1)[y] + spread[:, None] * torch.randn(B, D, generator=g) / 4
    return x, y, P


def nca_rows_cpu(x, y, P, scale):
    from metrix_ops.ops.proxy_nca import SQUARED_L2, proxy_nca_rows
    return proxy_nca_rows(F.normalize(x, dim=1), F.normalize(P, dim=1), y, scale, SQUARED_L2)
