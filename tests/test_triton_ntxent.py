"""The Triton NT-Xent and SupCon kernels (backend="triton") against the reference: values and
gradients over odd shapes and tile splits, PML's edge cases, ref_emb, reducers (NT-Xent's
per-positive-pair windows), the tiny guard at small temperatures, dtypes, that the kernels
really run, and bad input. On a CPU they run under TRITON_INTERPRET=1."""

import pytest
import torch
import torch.nn.functional as F

import metrix_ops as mo
import metrix_ops.triton as mt
from triton_cases import DEVICE
from cases import CASE_IDS, CASES, assert_close_vg, make_case, value_and_grad

DEV = DEVICE  # the GPU, or CPU tensors under TRITON_INTERPRET=1
pytestmark = pytest.mark.skipif(not mt.usable_on(DEV), reason=f"Triton cannot run on {DEV} here")

if mt.usable_on(DEV):
    import metrix_ops.triton.ntxent as tnx
    import metrix_ops.triton.proxy_anchor as tpa

NAMES = ["NTXentLoss", "SupConLoss"]


def loss(name, backend, **kw):
    mod = getattr(mo.losses, name)(backend=backend, **kw)
    return lambda y, **call: lambda e, *r: mod(e, y, ref_emb=r[0] if r else None, **call)


def data(B, D, k, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=torch.float64).to(dtype)
    return x.to(DEV), torch.randint(0, k, (B,), generator=g).to(DEV)


@pytest.fixture(params=["default", "small"])
def tiles(request, monkeypatch):
    """Default block sizes, or the smallest tl.dot allows (16): several blocks per axis."""
    if request.param == "small":
        for name in ("row_block", "dim_block", "out_block"):
            monkeypatch.setattr(tpa, name, lambda n, dev: 16)
        # column kernels stream in 3 parts (more than the tiles of some shapes: empty parts)
        monkeypatch.setattr(tpa, "stream_splits", lambda *args: 3)
    return request.param


@pytest.mark.parametrize("B,D,k", [(2, 16, 1), (5, 37, 2), (17, 3, 4), (33, 16, 5), (50, 37, 3)])
@pytest.mark.parametrize("name", NAMES)
def test_matches_reference_fp64(name, B, D, k):
    x, y = data(B, D, k, seed=B)
    t = 0.07 if B % 2 else 0.5  # the default, and a mild one
    assert_close_vg(loss(name, "triton", temperature=t)(y),
                    loss(name, "reference", temperature=t)(y), x)


@pytest.mark.parametrize("name", NAMES)
def test_small_tiles(name, tiles):
    # 16-wide blocks: several anchor, reference, feature and output-feature blocks
    x, y = data(35, 20, 4, seed=35)
    assert_close_vg(loss(name, "triton")(y), loss(name, "reference")(y), x)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_edge_cases(case):
    x, y = make_case(case)
    x, y = x.detach().to(DEV), y.to(DEV)
    for name in NAMES:
        assert_close_vg(loss(name, "triton")(y), loss(name, "reference")(y), x)


@pytest.mark.parametrize("name", NAMES)
def test_ref_emb(name):
    x, y = data(13, 6, 4, seed=12)
    r, ry = data(21, 6, 4, seed=13)
    fn = loss(name, "triton", temperature=0.3)
    ref = loss(name, "reference", temperature=0.3)
    assert_close_vg(lambda e, f: fn(y, ref_labels=ry)(e, f),
                    lambda e, f: ref(y, ref_labels=ry)(e, f), x, r)
    # ref_labels *is* labels: PML's same-set rule drops the pairs (i, i) of different tensors
    assert_close_vg(lambda e, f: fn(y, ref_labels=y)(e, f),
                    lambda e, f: ref(y, ref_labels=y)(e, f), x, r[:13])
    # anchors of class 0 have no negative among the references (their pair losses are 0)
    ya, ry0 = torch.tensor([0, 0, 1, 1, 0, 2], device=DEV), torch.zeros(7, dtype=torch.long, device=DEV)
    assert_close_vg(lambda e, f: fn(ya, ref_labels=ry0)(e, f),
                    lambda e, f: ref(ya, ref_labels=ry0)(e, f), x[:6], r[:7])


def test_simclr_two_views_match_pml():
    from pytorch_metric_learning import losses as pl
    g = torch.Generator().manual_seed(9)
    v1 = torch.randn(8, 12, dtype=torch.float64, generator=g)
    v2 = v1 + 0.3 * torch.randn(8, 12, dtype=torch.float64, generator=g)
    x, y = torch.cat([v1, v2]).to(DEV), torch.arange(8).repeat(2).to(DEV)
    for name in NAMES:
        pml = getattr(pl, name)()
        assert_close_vg(loss(name, "triton")(y), lambda e: pml(e, y), x)


@pytest.mark.parametrize("name,reducers", [
    ("NTXentLoss", ["MeanReducer", "SumReducer", "AvgNonZeroReducer", (0.5, 3.0), (None, 1.0)]),
    ("SupConLoss", ["MeanReducer", "SumReducer", "AvgNonZeroReducer", (1.0, None)]),
])
def test_reducers(name, reducers):
    x, y = data(23, 9, 4, seed=10)
    for red in reducers:
        make = (lambda r=red: getattr(mo.reducers, r)()) if isinstance(red, str) else \
            (lambda r=red: mo.reducers.ThresholdReducer(low=r[0], high=r[1]))
        assert_close_vg(loss(name, "triton", reducer=make(), temperature=0.2)(y),
                        loss(name, "reference", reducer=make(), temperature=0.2)(y), x)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype,t", [(torch.float64, 0.001), (torch.float32, 0.01)])
def test_small_temperature_tiny_guard(name, dtype, t):
    # logits up to 2/τ: past exp's range, so some positive pairs' q underflows to 0 and
    # PML's tiny inside the log decides their loss (and AvgNonZero's count)
    x, y = data(30, 8, 3, seed=14)
    for red in (None, mo.reducers.AvgNonZeroReducer()):
        kw = {"temperature": t, "reducer": red}
        # against the reference in the same dtype: where q underflows depends on it
        v, g = value_and_grad(loss(name, "triton", **kw)(y), x.to(dtype))
        vr, gr = value_and_grad(loss(name, "reference", **kw)(y), x.to(dtype))
        assert torch.isfinite(v) and torch.isfinite(g[0]).all()
        rtol = 1e-6 if dtype == torch.float64 else 1e-4
        torch.testing.assert_close(v, vr, rtol=rtol, atol=0)
        torch.testing.assert_close(g[0], gr[0], rtol=rtol, atol=rtol * gr[0].abs().max())


@pytest.mark.parametrize("name", NAMES)
def test_fp32_matches_fp64_reference(name):
    x, y = data(50, 37, 6, seed=8)
    v, (g,) = value_and_grad(loss(name, "triton")(y), x.float())
    vr, (gr,) = value_and_grad(loss(name, "reference")(y), x)
    assert v.dtype == g.dtype == torch.float32
    torch.testing.assert_close(v.double(), vr, rtol=1e-4, atol=0)
    torch.testing.assert_close(g.double(), gr, rtol=1e-4, atol=1e-4 * gr.abs().max())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_half_inputs(name, dtype, tol):
    x, y = data(24, 16, 5, seed=3)
    xl = x.to(dtype).requires_grad_(True)
    out = loss(name, "triton", temperature=0.2)(y)(xl)
    out.backward()
    assert out.dtype == torch.float32 and torch.isfinite(out)
    assert xl.grad.dtype == dtype and torch.isfinite(xl.grad).all() and xl.grad.abs().sum() > 0
    ref32 = loss(name, "reference", temperature=0.2)(y)(xl.detach().float())
    torch.testing.assert_close(out.detach(), ref32, rtol=1e-5, atol=1e-6)
    ref64 = loss(name, "reference", temperature=0.2)(y)(x)
    assert abs(float(out.detach()) - float(ref64)) <= tol * abs(float(ref64))


def test_ops_gradcheck():
    x, y = data(4, 3, 2, seed=4)
    r, ry = data(3, 3, 2, seed=5)
    xu, ru = F.normalize(x, dim=1), F.normalize(r, dim=1)
    w = torch.randn(4, dtype=torch.float64, device=DEV)
    fns = [lambda e, f: (tnx.ntxent_rows(e, f, y, ry, False, 0.3)[0] * w).sum(),
           lambda e, f: (tnx.ntxent_rows(e, f, y, ry, False, 0.3, 0.2, 2.0)[0] * w).sum(),
           lambda e, f: (tnx.supcon_rows(e, f, y, ry, False, 0.3) * w).sum()]
    for fn in fns:
        assert torch.autograd.gradcheck(fn, (xu.clone().requires_grad_(), ru.clone().requires_grad_()),
                                        fast_mode=True)


@pytest.mark.parametrize("name,kernels", [
    ("NTXentLoss", ["_ntx_fwd_kernel", "_pair_dx_kernel", "_pair_dr_kernel"]),
    ("SupConLoss", ["_sup_fwd_kernel", "_pair_dx_kernel", "_pair_dr_kernel"]),
])
def test_triton_backend_runs_the_kernels(name, kernels, monkeypatch):
    calls = []

    class Spy:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            calls.append(self.name)
            return self.kernel[grid]

    for k in kernels:
        monkeypatch.setattr(tnx, k, Spy(k, getattr(tnx, k)))
    x, y = data(9, 6, 3, seed=14)
    v, _ = value_and_grad(loss(name, "triton")(y), x)
    assert calls == kernels  # the batch against itself: both gradient kernels
    torch.testing.assert_close(v, loss(name, "reference")(y)(x))


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_and_scope(name):
    x, y = data(6, 4, 2, seed=16, dtype=torch.float32)
    with pytest.raises(ValueError, match="labels has 5 entries"):
        loss(name, "triton")(y[:5])(x)
    with pytest.raises(ValueError, match="embeddings contains NaN"):
        loss(name, "triton")(y)(x * float("nan"))
    it = mo.miners.MultiSimilarityMiner()(x, y)
    with pytest.raises(NotImplementedError, match=f"does not cover this {name} call"):
        loss(name, "triton")(y, indices_tuple=it)(x)
    with pytest.raises(NotImplementedError, match=f"does not cover this {name} call"):
        loss(name, "triton", distance=mo.distances.LpDistance())(y)(x)
    rows = tnx.ntxent_rows if name == "NTXentLoss" else tnx.supcon_rows
    with pytest.raises(TypeError, match="float32 or float64"):
        rows(x, x.double(), y, y, True, 0.1)
    with pytest.raises(ValueError, match="ref_labels must be int64"):
        rows(x, x, y, y.int(), True, 0.1)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        rows(x, x, y, y, True, 0.0)


@pytest.mark.parametrize("name", NAMES)
def test_under_autocast_equals_outside(name):
    x, y = data(29, 12, 5, seed=26)
    x = x.to(torch.bfloat16)
    outs = []
    for on in (True, False):
        e = x.clone().requires_grad_(True)
        with torch.autocast(DEV.type, dtype=torch.bfloat16, enabled=on):
            out = loss(name, "triton")(y)(e)
        out.backward()
        outs.append((out.detach(), e.grad.float()))
    assert outs[0][0].dtype == torch.float32
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(DEV.type == "cuda", reason="on a GPU the kernels run")
def test_kernels_compile_for_h100():
    from test_triton_proxy import compile_for_sm90
    m = "metrix_ops.triton.ntxent"
    compile_for_sm90([(m, "_ntx_fwd_kernel", {"SAME": True}), (m, "_sup_fwd_kernel", {"SAME": False}),
                      (m, "_pair_dx_kernel", {"LOSS": 0, "SAME": True}),
                      (m, "_pair_dr_kernel", {"LOSS": 1, "SAME": False})])
