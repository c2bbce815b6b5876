"""The Triton NPairsLoss (backend="triton": PML's first positive pair per label through the
Triton ProxyNCA kernels over the K×K problem) against the reference: values and gradients
over the shared cases, odd shapes with many labels (K over several tiles), the similarities
it covers (cosine, dot product with and without normalisation), reducers, fp32 and half
inputs; what it does not cover.

Without a GPU these run under TRITON_INTERPRET=1 on CPU tensors."""

import pytest
import torch

import metrix_ops as mo
from cases import CASE_IDS, CASES, assert_close_vg, make_case, value_and_grad
from triton_cases import on_dev, requires_triton

pytestmark = requires_triton

DISTANCES = {
    "default": lambda: None,
    "cos": lambda: mo.distances.CosineSimilarity(),
    "dot_raw": lambda: mo.distances.DotProductSimilarity(normalize_embeddings=False),
}


def pair(dist="default", **kw):
    d = DISTANCES[dist]
    return tuple(mo.losses.NPairsLoss(backend=b, **({} if d() is None else {"distance": d()}),
                                      **kw)
                 for b in ("triton", "reference"))


@pytest.fixture
def op_calls(monkeypatch):
    import metrix_ops.triton.npairs as tn
    calls, real = [], tn.proxy_nca_rows
    monkeypatch.setattr(tn, "proxy_nca_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dist", DISTANCES)
def test_matches_reference_fp64(case, dist):
    x, y = on_dev(*make_case(case))
    tri, ref = pair(dist)
    assert_close_vg(lambda e: tri(e, y), lambda e: ref(e, y), x)


@pytest.mark.parametrize("b,classes", [(3, 2), (41, 7), (150, 60)])
def test_odd_shapes_fp64(b, classes, op_calls):
    g = torch.Generator().manual_seed(b + classes)
    x = torch.randn(b, 13, dtype=torch.float64, generator=g)
    y = torch.randint(0, classes, (b,), generator=g)
    x, y = on_dev(x, y)
    tri, ref = pair()
    assert_close_vg(lambda e: tri(e, y), lambda e: ref(e, y), x)
    assert op_calls


def test_reducers():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(40, 9, dtype=torch.float64, generator=g)
    y = torch.randint(0, 9, (40,), generator=g)
    x, y = on_dev(x, y)
    for red in (mo.reducers.SumReducer(), mo.reducers.AvgNonZeroReducer(),
                mo.reducers.ThresholdReducer(low=1.0, high=3.0)):
        tri, ref = pair(reducer=red)
        assert_close_vg(lambda e: tri(e, y), lambda e: ref(e, y), x)


def test_fp32_and_half_inputs():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(45, 20, generator=g)
    y = torch.randint(0, 10, (45,), generator=g)
    x, y = on_dev(x, y)
    tri, ref = pair()
    v, (gx,) = value_and_grad(lambda e: tri(e, y), x)
    vr, (gr,) = value_and_grad(lambda e: ref(e, y), x.double())
    assert v.dtype == torch.float32 and gx.dtype == torch.float32
    torch.testing.assert_close(v.double(), vr, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gx.double(), gr, rtol=1e-4, atol=1e-6)
    for half in (torch.float16, torch.bfloat16):
        h = x.detach().to(half).requires_grad_()
        v = tri(h, y)
        v.backward()
        assert v.dtype == torch.float32 and h.grad.dtype == half
        assert torch.isfinite(h.grad).all()
        torch.testing.assert_close(v, ref(h.detach().float(), y), rtol=1e-3, atol=1e-4)


def test_not_covered():
    x, y = on_dev(*make_case(CASES[0]))
    loss = mo.losses.NPairsLoss(backend="triton", distance=mo.distances.LpDistance())
    with pytest.raises(NotImplementedError, match="does not cover"):
        loss(x, y)
