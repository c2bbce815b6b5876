"""The Triton proxy-anchor and ProxyNCA kernels (backend="triton") against the reference:
values and gradients w.r.t. embeddings and proxies over odd shapes and tile splits, edge
cases (absent classes, one class, duplicates, large α, underflowing rows), reducers, dtypes,
that the kernels really run, and bad input. On a CPU they run under TRITON_INTERPRET=1."""
import os
from functools import partial

import pytest
import torch
import torch.nn.functional as F

import metrix_ops as mo
import metrix_ops.triton as mt
from triton_cases import DEVICE
from cases import assert_close_vg, value_and_grad
from test_fused_proxy_cpu import module_fn, pml_module_fn

DEV = DEVICE  # the GPU, or CPU tensors under TRITON_INTERPRET=1
pytestmark = pytest.mark.skipif(not mt.usable_on(DEV), reason=f"Triton cannot run on {DEV} here")

if mt.usable_on(DEV):
    import metrix_ops.triton.proxy_anchor as tpa
    import metrix_ops.triton.proxy_nca as tnca

pa_fn, nca_fn = partial(module_fn, "ProxyAnchorLoss"), partial(module_fn, "ProxyNCALoss")


def data(B, C, D, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=torch.float64).to(dtype)
    P = torch.randn(C, D, generator=g, dtype=torch.float64).to(dtype)
    return x.to(DEV), torch.randint(0, C, (B,), generator=g).to(DEV), P.to(DEV)


@pytest.fixture(params=["default", "small"])
def tiles(request, monkeypatch):
    """The launch's block sizes: the default, or the smallest tl.dot allows (16), so that
    every kernel runs several row, column, feature and output-feature blocks."""
    if request.param == "small":
        for name in ("row_block", "dim_block", "out_block"):
            monkeypatch.setattr(tpa, name, lambda n, dev: 16)
        # column kernels stream in 3 parts (more than the tiles of some shapes: empty parts)
        monkeypatch.setattr(tpa, "stream_splits", lambda *args: 3)
    return request.param


SHAPES = [(1, 1, 3), (2, 3, 16), (5, 7, 37), (17, 20, 3), (33, 3, 16), (50, 7, 37)]


# ---------------------------------------------------------------- ProxyAnchorLoss

def merge_lse_with_one(m, l):
    """log(1 + Σ) from per-part log-sum-exp states (max m, Σ e^{· − m}), parts along dim 0;
    a part with nothing has m = −inf, l = 0: the merge kernel's plain-torch form."""
    top = torch.clamp(m.amax(0), min=0)  # the 1 is e^0
    return top + torch.log((l * torch.exp(m - top)).sum(0) + torch.exp(-top))


@pytest.mark.parametrize("parts,C", [(1, 1), (3, 5), (4, 1100)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pa_merge_kernel_matches_torch(parts, C, dtype):
    """The forward's merge of partial log-sum-exp states (one launch) against its plain-torch
    form: large and negative maxima, and empty parts (m = −inf, l = 0) of a side."""
    g = torch.Generator().manual_seed(parts * 7 + C)
    m = (torch.randn(4, parts, C, generator=g, dtype=torch.float64) * 40).to(dtype)
    l = (torch.rand(4, parts, C, generator=g, dtype=torch.float64) * 5 + 1).to(dtype)
    empty = torch.rand(4, parts, C, generator=g) < 0.3
    empty[:, :, 0] = True  # a proxy with no term on either side: log(1 + 0) = 0
    m[empty], l[empty] = float("-inf"), 0.0
    state = torch.stack([m[0], l[0], m[1], l[1]]).contiguous().to(DEV)
    pos, neg = tpa.merge_states(state)
    torch.testing.assert_close(pos, merge_lse_with_one(state[0], state[1]))
    torch.testing.assert_close(neg, merge_lse_with_one(state[2], state[3]))
    assert pos[0] == 0 and neg[0] == 0


@pytest.mark.parametrize("B,C,D", SHAPES)
def test_pa_matches_reference_fp64(B, C, D, tiles):
    x, y, P = data(B, C, D, seed=B * 100 + C)
    if B >= 17:
        y[y == C - 1] = 0  # a proxy with no example
    v = assert_close_vg(pa_fn(C, D, "triton")(y), pa_fn(C, D, "reference")(y), x, P)
    assert torch.isfinite(v) and v > 0


@pytest.mark.parametrize("kw", [{"margin": 0.25, "alpha": 16.0}, {"margin": -0.1, "alpha": 2.0}])
def test_pa_hyper_parameters_and_pml(kw):
    x, y, P = data(41, 7, 9, seed=3)
    assert_close_vg(pa_fn(7, 9, "triton", **kw)(y), pml_module_fn("ProxyAnchorLoss", 7, 9, **kw)(y),
                    x, P)
    assert_close_vg(pa_fn(7, 9, "triton", **kw)(y), pa_fn(7, 9, "reference", **kw)(y), x, P)


def test_pa_edge_cases():
    D, C = 6, 5
    x, _, P = data(12, C, D, seed=5)
    labels = {
        "absent_classes": torch.tensor([0, 1, 1, 3, 0, 3, 1, 0, 0, 3, 1, 1]),  # no 2, no 4
        "one_class": torch.full((12,), 4),
        "all_distinct": torch.arange(12) % C,
    }
    for y in labels.values():
        y = y.to(DEV)
        assert_close_vg(pa_fn(C, D, "triton")(y), pa_fn(C, D, "reference")(y), x, P)
    y = labels["absent_classes"].to(DEV)
    pos, neg = tpa.proxy_anchor_terms(F.normalize(x, dim=1), F.normalize(P, dim=1), y, 32.0, 0.1)
    assert pos[2] == 0 and pos[4] == 0 and (pos[[0, 1, 3]] > 0).all() and (neg > 0).all()
    _, (gx, gP) = value_and_grad(pa_fn(C, D, "triton")(y), x, P)
    assert gP[2].abs().sum() > 0  # a proxy with no example still gets its negatives' gradient


def test_pa_duplicates():
    x, y, P = data(10, 4, 8, seed=6)
    x[1], x[5], x[6] = x[0], x[3], x[3]
    y[1] = y[0]
    y[5] = (y[3] + 1) % 4  # a duplicate that is a negative for the other's proxy
    P[2] = P[1]  # duplicate proxies too
    assert_close_vg(pa_fn(4, 8, "triton")(y), pa_fn(4, 8, "reference")(y), x, P)


@pytest.mark.parametrize("alpha", [32.0, 100.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pa_large_alpha_near_identical_vectors(alpha, dtype):
    # every similarity ≈ 1: α(s + δ) ≈ 1.1α, past fp16's e^11 at α = 32, fp32's e^88.7 at 100
    g = torch.Generator().manual_seed(7)
    base = torch.randn(1, 32, generator=g, dtype=torch.float64)
    x = (base + 1e-4 * torch.randn(40, 32, generator=g, dtype=torch.float64)).to(DEV)
    P = (base + 1e-4 * torch.randn(3, 32, generator=g, dtype=torch.float64)).to(DEV)
    y = torch.randint(0, 3, (40,), generator=g).to(DEV)
    v, (gx, gP) = value_and_grad(pa_fn(3, 32, "triton", alpha=alpha)(y), x.to(dtype), P.to(dtype))
    assert torch.isfinite(v) and torch.isfinite(gx).all() and torch.isfinite(gP).all()
    vr, (gxr, gPr) = value_and_grad(pa_fn(3, 32, "reference", alpha=alpha)(y), x, P)
    rtol = 1e-6 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(v.double(), vr, rtol=rtol, atol=0)
    # the gradients cancel to tiny values; fp32 cannot resolve 1 − s ≈ 1e-8: a looser bound
    gtol = 1e-6 if dtype == torch.float64 else 5e-3
    for a, b in ((gx, gxr), (gP, gPr)):
        torch.testing.assert_close(a.double(), b, rtol=0, atol=gtol * b.abs().max())


@pytest.mark.parametrize("loss", ["ProxyAnchorLoss", "ProxyNCALoss"])
def test_fp32_matches_fp64_reference(loss):
    x, y, P = data(50, 20, 37, seed=8)
    fn = partial(module_fn, loss)
    v, (gx, gP) = value_and_grad(fn(20, 37, "triton")(y), x.float(), P.float())
    vr, (gxr, gPr) = value_and_grad(fn(20, 37, "reference")(y), x, P)
    assert v.dtype == gx.dtype == gP.dtype == torch.float32
    torch.testing.assert_close(v.double(), vr, rtol=1e-4, atol=0)
    for a, b in ((gx, gxr), (gP, gPr)):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4 * b.abs().max())


@pytest.mark.parametrize("scale", [30.0, 60.0])
def test_nca_confident_rows_count_as_pml_in_fp32(scale):
    """The kernel's row is (max − own) + log Σ: 0 exactly where PML's own-proxy probability
    rounds to 1, so AvgNonZero counts PML's rows (test_fused_proxy_cpu.py's case)."""
    from pytorch_metric_learning import reducers as pr
    from test_fused_proxy_cpu import confident_nca_case, pml_module_fn
    x, y, P = confident_nca_case()
    C, D = P.shape
    kw = {"softmax_scale": scale}
    ours = nca_fn(C, D, "triton", reducer=mo.reducers.AvgNonZeroReducer(), **kw)
    pml = pml_module_fn("ProxyNCALoss", C, D, reducer=pr.AvgNonZeroReducer(), **kw)
    va, ga = value_and_grad(ours(y.to(DEV)), x.to(DEV), P.to(DEV))
    vb, gb = value_and_grad(pml(y), x, P)
    torch.testing.assert_close(va.cpu(), vb, rtol=1e-5, atol=0)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("loss", ["ProxyAnchorLoss", "ProxyNCALoss"])
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_half_inputs(loss, dtype, tol):
    x, y, P = data(40, 6, 16, seed=9)
    fn = partial(module_fn, loss)
    xl, Pl = x.to(dtype).requires_grad_(True), P.to(dtype).requires_grad_(True)
    out = fn(6, 16, "triton")(y)(xl, Pl)
    out.backward()
    assert out.dtype == torch.float32 and torch.isfinite(out)
    assert xl.grad.dtype == Pl.grad.dtype == dtype
    assert torch.isfinite(xl.grad).all() and torch.isfinite(Pl.grad).all()
    ref32 = fn(6, 16, "reference")(y)(xl.detach().float(), Pl.detach().float())
    torch.testing.assert_close(out.detach(), ref32, rtol=1e-5, atol=1e-6)  # same fp32 inputs
    ref64 = fn(6, 16, "reference")(y)(x, P)
    assert abs(float(out.detach()) - float(ref64)) <= tol * abs(float(ref64))


@pytest.mark.parametrize("red", ["MeanReducer", "SumReducer", "AvgNonZeroReducer"])
def test_pa_reducers(red):
    x, y, P = data(23, 9, 5, seed=10)
    y[y == 4] = 3  # a class with no example: its pos term is a zero AvgNonZero skips
    kw = {"reducer": getattr(mo.reducers, red)()}
    assert_close_vg(pa_fn(9, 5, "triton", **kw)(y), pa_fn(9, 5, "reference", **kw)(y), x, P)
    thr = {"reducer": mo.reducers.ThresholdReducer(low=0.5, high=4.0)}
    assert_close_vg(pa_fn(9, 5, "triton", **thr)(y), pa_fn(9, 5, "reference", **thr)(y), x, P)


@pytest.mark.parametrize("loss", ["ProxyAnchorLoss", "ProxyNCALoss"])
def test_module_parameter_gets_gradient(loss):
    x, y, P = data(17, 4, 8, seed=11)
    grads = []
    for backend in ("triton", "reference"):
        mod = getattr(mo.losses, loss)(4, 8, backend=backend).to(DEV)  # fp32 parameter, fp64 inputs
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


def test_ops_gradcheck():
    x, y, P = data(4, 3, 3, seed=12)
    xu, pu = F.normalize(x, dim=1), F.normalize(P, dim=1)
    w = torch.randn(2, 3, dtype=torch.float64, device=DEV)  # unequal weights for both outputs

    def f(e, p):
        pos, neg = tpa.proxy_anchor_terms(e, p, y, 4.0, 0.1)
        return (pos * w[0]).sum() + (neg * w[1]).sum()

    def f_pos(e, p):  # one output used: the other's gradient arrives as None
        return tpa.proxy_anchor_terms(e, p, y, 4.0, 0.1)[0].sum()

    def f_nca(e, p):
        return (tnca.proxy_nca_rows(e, p, y, 3.0, tnca.SQUARED_L2) * w[0, :1]).sum()

    for fn in (f, f_pos, f_nca):
        assert torch.autograd.gradcheck(fn, (xu.clone().requires_grad_(), pu.clone().requires_grad_()),
                                        fast_mode=True)
    # only the embeddings need a gradient: the proxies' kernel is skipped, dx unchanged
    e = xu.clone().requires_grad_()
    (gx,) = torch.autograd.grad(f(e, pu), e)
    torch.testing.assert_close(gx, torch.autograd.grad(f(e, pu.clone().requires_grad_()), e)[0])


@pytest.mark.parametrize("loss,kernels", [
    ("ProxyAnchorLoss", ("_pa_fwd_kernel", "_pa_dx_kernel", "_pa_dp_kernel")),
    ("ProxyNCALoss", ("_nca_fwd_kernel", "_nca_dx_kernel", "_nca_dp_kernel")),
])
def test_triton_backend_runs_the_kernels(loss, kernels, monkeypatch):
    calls = []
    mod = tpa if loss == "ProxyAnchorLoss" else tnca

    class Spy:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            calls.append(self.name)
            return self.kernel[grid]

    for k in kernels:
        monkeypatch.setattr(mod, k, Spy(k, getattr(mod, k)))
    x, y, P = data(9, 4, 6, seed=14)
    v, _ = value_and_grad(module_fn(loss, 4, 6, "triton")(y), x, P)
    assert calls == list(kernels)
    torch.testing.assert_close(v, module_fn(loss, 4, 6, "reference")(y)(x, P))
    if DEV.type == "cpu":  # "auto" on CPU tensors is the C++ engine, never the interpreter
        assert mo.backend.resolve("auto", loss, DEV) in ("cpu", "reference")


@pytest.mark.parametrize("loss", ["ProxyAnchorLoss", "ProxyNCALoss"])
def test_bad_input_and_scope(loss):
    x, y, P = data(6, 3, 4, seed=16, dtype=torch.float32)
    cls = getattr(mo.losses, loss)
    bad = torch.tensor([0, 1, 2, 3, 0, 1], device=DEV)
    with pytest.raises(ValueError, match=r"labels must be in \[0, num_classes=3\)"):
        cls(3, 4, backend="triton").to(DEV)(x, bad)
    with pytest.raises(ValueError, match="labels has 5 entries"):
        cls(3, 4, backend="triton").to(DEV)(x, y[:5])
    with pytest.raises(ValueError, match=r"proxies must be \(num_classes, 4\)"):
        fn = getattr(mo.functional, "proxy_anchor_loss" if loss == "ProxyAnchorLoss" else "proxy_nca_loss")
        fn(x, y, proxies=torch.randn(3, 5, device=DEV), backend="triton")
    with pytest.raises(ValueError, match="embeddings contains NaN"):
        cls(3, 4, backend="triton").to(DEV)(x * float("nan"), y)
    # outside the kernels' scope: explicit backend refuses, "auto" gives the reference
    it = mo.miners.MultiSimilarityMiner()(x, y)
    with pytest.raises(NotImplementedError, match=f"does not cover this {loss} call"):
        module_fn(loss, 3, 4, "triton")(y, indices_tuple=it)(x, P)
    with pytest.raises(NotImplementedError, match=f"does not cover this {loss} call"):
        module_fn(loss, 3, 4, "triton", distance=mo.distances.LpDistance())(y)(x, P)
    # the kernels' own contract, for internal callers
    if loss == "ProxyAnchorLoss":
        def terms(x_, p_, y_):
            return tpa.proxy_anchor_terms(x_, p_, y_, 32.0, 0.1)
    else:
        def terms(x_, p_, y_):
            return tnca.proxy_nca_rows(x_, p_, y_, 1.0, tnca.COSINE)
    with pytest.raises(TypeError, match="float32 or float64"):
        terms(x, P.double(), y)
    with pytest.raises(ValueError, match="labels must be int64"):
        terms(x, P, y.int())
    with pytest.raises(ValueError, match="same D"):
        terms(x, P[:, :3], y)


# ---------------------------------------------------------------- ProxyNCALoss

@pytest.mark.parametrize("B,C,D", SHAPES)
def test_nca_matches_reference_fp64(B, C, D, tiles):
    x, y, P = data(B, C, D, seed=B * 100 + C + 1)
    if B >= 17:
        y[y == C - 1] = 0  # a proxy with no example
    fused = nca_fn(C, D, "triton", softmax_scale=3.0)(y)
    v = assert_close_vg(fused, nca_fn(C, D, "reference", softmax_scale=3.0)(y), x, P)
    assert torch.isfinite(v) and (C == 1 or v > 0)


@pytest.mark.parametrize("kw", [
    {},
    {"temperature": 0.1},  # ProxyNCA++: the logits over T
    {"softmax_scale": 2.0, "temperature": 0.5, "normalize_proxies": True},
    {"softmax_scale": 16.0, "distance": "cos"},
    {"temperature": 0.05, "distance": "cos", "reducer": "SumReducer"},
    {"softmax_scale": 4.0, "reducer": "AvgNonZeroReducer"},
])
def test_nca_options(kw):
    kw = dict(kw)
    if kw.get("distance") == "cos":
        kw["distance"] = mo.distances.CosineSimilarity()
    if "reducer" in kw:
        kw["reducer"] = getattr(mo.reducers, kw["reducer"])()
    x, y, P = data(41, 7, 9, seed=21)
    P = 3 * P  # far from unit norm: the kernels must see normalised proxies
    y[y == 2] = 0  # a class with no example
    x[4] = x[3]  # duplicates
    assert_close_vg(nca_fn(7, 9, "triton", **kw)(y), nca_fn(7, 9, "reference", **kw)(y), x, P)


def test_nca_pml():
    x, y, P = data(33, 5, 16, seed=22)
    assert_close_vg(nca_fn(5, 16, "triton", temperature=0.2)(y),
                    pml_module_fn("ProxyNCALoss", 5, 16, softmax_scale=5.0)(y), x, P)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nca_underflow_rows_dropped_as_pml(dtype):
    x, y, P = data(31, 6, 16, seed=22, dtype=dtype)
    scale = 3000.0 if dtype == torch.float64 else 400.0
    d2 = torch.cdist(F.normalize(x, dim=1), F.normalize(P, dim=1)) ** 2
    prob = torch.softmax(-scale * d2, dim=1).gather(1, y[:, None]).squeeze(1)
    assert (prob == 0).any() and (prob != 0).any()  # the case really exercises the rule
    v, g = value_and_grad(nca_fn(6, 16, "triton", softmax_scale=scale)(y), x, P)
    vr, gr = value_and_grad(nca_fn(6, 16, "reference", softmax_scale=scale)(y), x, P)
    assert torch.isfinite(v)
    rtol = 1e-6 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(v, vr, rtol=rtol, atol=0)
    for a, b in zip(g, gr):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * b.abs().max())


def test_nca_scope():
    x, y, P = data(15, 4, 6, seed=25)
    with pytest.raises(NotImplementedError, match="does not cover this ProxyNCALoss call"):
        nca_fn(4, 6, "triton", normalize_proxies=False)(y)(x, P)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        nca_fn(4, 6, "triton", temperature=0.0)(y)(x, P)
    with pytest.raises(ValueError, match="kind must be 0 or 1"):
        tnca.proxy_nca_rows(x, P, y, 1.0, 2)


@pytest.mark.parametrize("loss", ["ProxyAnchorLoss", "ProxyNCALoss"])
def test_under_autocast_equals_outside(loss):
    x, y, P = data(29, 5, 12, seed=26)
    x = x.to(torch.bfloat16)
    outs = []
    for on in (True, False):
        torch.manual_seed(3)  # the same proxies
        mod = getattr(mo.losses, loss)(5, 12, backend="triton").to(DEV)
        e = x.clone().requires_grad_(True)
        with torch.autocast(DEV.type, dtype=torch.bfloat16, enabled=on):
            out = mod(e, y)
        out.backward()
        outs.append((out.detach(), e.grad.float(), mod.proxies.grad))
    assert outs[0][0].dtype == torch.float32
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- compiled for a GPU

_COMPILE = r'''
import json, sys
import torch, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
import importlib
from metrix_ops.triton.proxy_anchor import GPU_TILES
sys.path.insert(0, sys.argv[3])
from triton_cases import ast_source

INTS = {"B", "C", "D", "M", "stride_x", "stride_p", "stride_r", "stride_dx", "stride_dp",
        "stride_dr", "split_len"}
failed = []
for module, name, extra in json.loads(sys.argv[1]):
    fn = getattr(importlib.import_module(module), name)
    for dtype, acc, prec in [(torch.float32, tl.float32, "tf32"), (torch.float64, tl.float64, "ieee")][:int(sys.argv[2])]:
        grad = "BLOCK_DO" in fn.arg_names
        own, loop, d, out, warps = GPU_TILES[(dtype, grad)]
        blocks = [n for n in fn.arg_names if n.startswith("BLOCK_") and n not in ("BLOCK_D", "BLOCK_DO")]
        consts = dict(extra, ACC=acc, PRECISION=prec, BLOCK_D=d, **{blocks[0]: own, blocks[1]: loop})
        if grad:
            consts["BLOCK_DO"] = out
        fdt = "fp32" if dtype == torch.float32 else "fp64"
        sig = {n: "constexpr" if n in consts else "i32" if n in INTS else "*i64" if n in ("y_ptr", "yr_ptr")
               else "*i32" if n == "counts_ptr" else "*" + fdt for n in fn.arg_names}
        src = ast_source(fn, sig, consts)
        try:
            triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        except Exception as e:  # noqa: BLE001
            failed.append(f"{name} {extra} {fdt}: {type(e).__name__}: {str(e)[:300]}")
print("\n".join(failed))
sys.exit(1 if failed else 0)
'''


def compile_for_sm90(kernels, fp64=False):
    """Compile kernels [(module, name, constexprs)] for an H100 (sm_90) with the GPU tile
    sizes, fp32 (and fp64 where this triton can tl.dot it: launch.FP64_DOT), as a GPU run
    would: what the interpreter cannot check (types of loop-carried values, constexpr
    branches, tl.dot shapes, shared memory). Needs no GPU; runs in a subprocess without
    TRITON_INTERPRET, where triton.jit gives real kernels."""
    import json
    import subprocess
    import sys
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        pytest.skip("this triton has no CUDA backend to compile with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    from metrix_ops.triton.launch import FP64_DOT
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-c", _COMPILE, json.dumps(kernels),
                          str(1 + (fp64 and FP64_DOT)), here], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]


@pytest.mark.skipif(DEV.type == "cuda", reason="on a GPU the kernels run")
def test_kernels_compile_for_h100():
    compile_for_sm90([("metrix_ops.triton.proxy_anchor", k, {})
                      for k in ("_pa_fwd_kernel", "_pa_dx_kernel", "_pa_dp_kernel")]
                     + [("metrix_ops.triton.proxy_nca", "_nca_fwd_kernel", {"KIND": 1}),
                        ("metrix_ops.triton.proxy_nca", "_nca_dx_kernel", {"KIND": 0}),
                        ("metrix_ops.triton.proxy_nca", "_nca_dp_kernel", {"KIND": 1})])
