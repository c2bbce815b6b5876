"""ProxyAnchorLoss and ProxyNCALoss(++) with embedding-level Metrix through the fused CPU
ops, against the reference (its K×C closed-form candidates, K = ordered batch pairs):
values and gradients w.r.t. embeddings AND proxies over the shared cases, every `pairs`,
λ at and inside [0, 1] and drawn, proxies present and absent, several Gram blocks, the NCA
options, dtypes; the ops' checks, opcheck, and that backend="auto" takes the ops."""
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import metrix_ops as mo
import metrix_ops.ops.proxy_metrix as pm_ops
from cases import CASE_IDS, CASES, assert_close_vg, make_case, value_and_grad
from metrix_ops import _ext

pytestmark = pytest.mark.skipif(not _ext.HAS_EXT, reason="extension not built")

LOSSES = ["ProxyAnchorLoss", "ProxyNCALoss"]
PAIRS = ["pos_neg", "anchor_neg", "pos_pos", "neg_neg"]


def loss_fn(name, C, D, backend, lam=0.3, pairs="pos_neg", weight=0.4, **kw):
    """f(y) -> (e, P) -> loss, the proxies an input so their gradient is compared too."""
    cfg = mo.Metrix(level="embedding", pairs=pairs, lam=lam, weight=weight)
    mod = getattr(mo.losses, name)(C, D, backend=backend, metrix=cfg, **kw)
    return lambda y: lambda e, P: functional_call(mod, {"proxies": P}, (e, y))


def both(name, C, D, **kw):
    return loss_fn(name, C, D, "cpu", **kw), loss_fn(name, C, D, "reference", **kw)


@pytest.fixture
def op_calls(monkeypatch):
    """How many times a module reached the fused Metrix ops."""
    import metrix_ops.fused.proxy_metrix as fpm
    calls = []
    for fn in ("proxy_anchor_metrix_terms", "proxy_nca_metrix_rows"):
        real = getattr(fpm, fn)
        monkeypatch.setattr(fpm, fn, lambda *a, real=real, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.fixture
def chunk(request, monkeypatch):
    """Gram rows per block of the fused ops; None: the ops' default."""
    if request.param is not None:
        monkeypatch.setattr(pm_ops, "default_chunk", lambda n: request.param)
    return request.param


def proxies(C, D, seed, dtype=torch.float64):
    return torch.randn(C, D, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("chunk", [3], indirect=True)
@pytest.mark.parametrize("extra", [0, 6], ids=["C_tight", "C_absent_proxies"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("pairs", PAIRS)
@pytest.mark.parametrize("name", LOSSES)
def test_matches_reference_fp64(name, pairs, lam, case, extra, chunk, op_calls):
    x, y = make_case(case)
    C = int(y.max()) + 1 + extra
    fused, ref = both(name, C, x.shape[1], lam=lam, pairs=pairs)
    assert_close_vg(fused(y), ref(y), x.detach(), proxies(C, x.shape[1], len(x)))
    assert op_calls


@pytest.mark.parametrize("pairs", PAIRS)
@pytest.mark.parametrize("name", LOSSES)
def test_mixed_term_is_not_trivial(name, pairs):
    """The Metrix term itself (weight large, λ inside) moves value and gradients: the
    comparisons above would also pass if it were dropped on both sides."""
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(23, 6, dtype=torch.float64, generator=g), torch.randint(0, 4, (23,), generator=g)
    P = proxies(5, 6, 1)
    fused, ref = both(name, 5, 6, lam=0.37, pairs=pairs, weight=3.0)
    v = assert_close_vg(fused(y), ref(y), x, P)
    clean = loss_fn(name, 5, 6, "cpu", weight=0.0)(y)
    vc, (gx, gP) = value_and_grad(clean, x, P)
    _, (fx, fP) = value_and_grad(fused(y), x, P)
    assert abs(float(v - vc)) > 1e-3 * abs(float(vc))
    assert (fx - gx).abs().max() > 1e-4 and (fP - gP).abs().max() > 1e-4


@pytest.mark.parametrize("chunk", [1, 7, None], indirect=True)
@pytest.mark.parametrize("C,B", [(101, 37), (3, 37), (9, 300)], ids=["C_gt_B", "C_lt_B", "B300"])
@pytest.mark.parametrize("name", LOSSES)
def test_sizes_and_blocks(name, C, B, chunk):
    """C above and below B; B = 300 with blocks of 7 rows: 43 Gram blocks (and one block
    row, one whole batch)."""
    g = torch.Generator().manual_seed(B + C)
    x = torch.randn(B, 16, dtype=torch.float64, generator=g)
    y = torch.randint(0, min(C, 9), (B,), generator=g)
    fused, ref = both(name, C, 16, lam=0.62)
    assert_close_vg(fused(y), ref(y), x, proxies(C, 16, 2))


@pytest.mark.parametrize("kw", [{"margin": 0.25, "alpha": 16.0}, {"margin": 0.0, "alpha": 48.0},
                                {"margin": -0.1, "alpha": 2.0}])
def test_proxy_anchor_hyper_parameters(kw):
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(41, 9, dtype=torch.float64, generator=g), torch.randint(0, 7, (41,), generator=g)
    fused, ref = both("ProxyAnchorLoss", 7, 9, lam=0.45, weight=1.3, **kw)
    assert_close_vg(fused(y), ref(y), x, proxies(7, 9, 3))


@pytest.mark.parametrize("pairs", ["pos_neg", "pos_pos"])
@pytest.mark.parametrize("kw", [{"softmax_scale": 3.0}, {"temperature": 0.1},
                                {"softmax_scale": 2.0, "temperature": 0.25, "normalize_proxies": True},
                                {"distance": "cosine", "temperature": 0.05},
                                {"distance": "cosine", "softmax_scale": 16.0}])
def test_proxy_nca_options(kw, pairs, op_calls):
    kw = dict(kw)
    if kw.pop("distance", None) == "cosine":
        kw["distance"] = mo.distances.CosineSimilarity()
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(33, 8, dtype=torch.float64, generator=g), torch.randint(0, 6, (33,), generator=g)
    fused, ref = both("ProxyNCALoss", 6, 8, lam=0.71, pairs=pairs, **kw)
    assert_close_vg(fused(y), ref(y), x, proxies(6, 8, 4))
    assert op_calls


@pytest.mark.parametrize("name", LOSSES)
def test_proxy_coincident_with_candidates(name):
    """A proxy equal to an example and λ = 1 (the mix is the example): the squared-L2
    zero subgradient of coincident points, and ProxyAnchor's cosine ≈ 1."""
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(10, 5, dtype=torch.float64, generator=g), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 3])
    P = proxies(4, 5, 5)
    P[1] = x[0] * 2.5
    fused, ref = both(name, 4, 5, lam=1.0)
    assert_close_vg(fused(y), ref(y), x, P)


@pytest.mark.parametrize("name", LOSSES)
def test_drawn_lambda_is_the_reference_draw(name):
    """λ drawn per call (no fixed λ): the same seeded draw reaches both backends."""
    g = torch.Generator().manual_seed(9)
    x, y = torch.randn(15, 4, dtype=torch.float64, generator=g), torch.randint(0, 4, (15,), generator=g)
    fused, ref = both(name, 4, 4, lam=None)
    P = proxies(4, 4, 6)
    torch.manual_seed(11)
    a = value_and_grad(fused(y), x, P)
    torch.manual_seed(11)
    b = value_and_grad(ref(y), x, P)
    torch.manual_seed(12)
    c = value_and_grad(ref(y), x, P)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    assert not torch.allclose(b[0], c[0])  # the draw matters


@pytest.mark.parametrize("simd", [None, "baseline", "avx2", "avx512"])
@pytest.mark.parametrize("name", LOSSES)
def test_fp32_matches_fp64_reference(name, simd, monkeypatch):
    """fp32 against the fp64 reference, at the default level and at each x86 level (the
    rows of both losses take 4 floats a lane group in the baseline build, 8 under AVX2, 16
    under AVX-512; B = 67 leaves a tail of lanes at every width)"""
    if simd is not None:
        monkeypatch.setenv("METRIX_OPS_SIMD", simd)
        try:
            torch.ops.metrix_ops._simd_level()
        except RuntimeError:
            pytest.skip(f"this CPU lacks {simd}")
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(67, 24, generator=g), torch.randint(0, 9, (67,), generator=g)
    P = proxies(11, 24, 7, torch.float32)
    fused, ref = both(name, 11, 24, lam=0.35)
    v, (gx, gP) = value_and_grad(fused(y), x, P)
    vr, (gxr, gPr) = value_and_grad(ref(y), x.double(), P.double())
    assert v.dtype == gx.dtype == gP.dtype == torch.float32
    torch.testing.assert_close(v.double(), vr, rtol=1e-4, atol=0)
    for a, b in ((gx, gxr), (gP, gPr)):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4 * b.abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_alpha_near_identical_vectors(dtype):
    """ProxyAnchor at α = 32 with every cosine ≈ 1: e^{α(s+δ)} summed over B² candidates
    overflows fp16 and fp32 naive sums; the log-sum-exp form stays finite."""
    g = torch.Generator().manual_seed(7)
    base = torch.randn(1, 32, generator=g, dtype=torch.float64)
    x = base + 1e-3 * torch.randn(64, 32, generator=g, dtype=torch.float64)
    P = base + 1e-3 * torch.randn(3, 32, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (64,), generator=g)
    fused, ref = both("ProxyAnchorLoss", 3, 32, lam=0.5, alpha=100.0)
    v, (gx, gP) = value_and_grad(fused(y), x.to(dtype), P.to(dtype))
    vr, (gxr, gPr) = value_and_grad(ref(y), x, P)
    assert torch.isfinite(v) and torch.isfinite(gx).all() and torch.isfinite(gP).all()
    rtol = 1e-6 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(v.double(), vr, rtol=rtol, atol=0)
    gtol = 1e-6 if dtype == torch.float64 else 5e-3  # fp32 cannot resolve 1 − s ≈ 1e-6 well
    for a, b in ((gx, gxr), (gP, gPr)):
        torch.testing.assert_close(a.double(), b, rtol=0, atol=gtol * b.abs().max())


@pytest.mark.parametrize("pairs", ["pos_neg", "pos_pos"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_proxy_anchor_exps_below_the_fixed_shift(dtype, pairs):
    """The fused rows shift every exp by the exponents' bound α(1 + |δ|) and redo a proxy
    with its max where that sum underflows. At α = 200 in 48 dimensions the cosines stay
    within ±0.6, so the exponents α(s ± δ) stay ~100 below the bound 220: the shifted sums
    are 0 in fp32, though the terms (up to e^{100}) dominate the loss."""
    g = torch.Generator().manual_seed(10)
    x, y = torch.randn(29, 48, generator=g, dtype=torch.float64), torch.randint(0, 5, (29,), generator=g)
    P = proxies(5, 48, 12)
    fused, ref = both("ProxyAnchorLoss", 5, 48, lam=0.4, pairs=pairs, weight=1.0, alpha=200.0,
                      margin=0.1)
    v, (gx, gP) = value_and_grad(fused(y), x.to(dtype), P.to(dtype))
    vr, (gxr, gPr) = value_and_grad(ref(y), x, P)
    rtol = 1e-6 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(v.double(), vr, rtol=rtol, atol=0)
    for a, b in ((gx, gxr), (gP, gPr)):
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=rtol * b.abs().max())


def test_proxy_nca_logits_below_the_fixed_shift():
    """ProxyNCA's candidate softmax is shifted by the logits' bound (|scale| for cosine): with
    every proxy opposite the data (s ≈ −0.9) at scale 60 every logit is ~114 below it, so each
    candidate's softmax is the redo with its max. fp64 against the reference; the op in fp32
    against the op in fp64 (this loss's fp32 value is ill-conditioned here: the reference and
    PML in fp32 differ from fp64 by 1–3%, as the fused op does)."""
    g = torch.Generator().manual_seed(11)
    e0 = F.one_hot(torch.tensor(0), 6).double()
    x = e0 + 0.25 * torch.randn(23, 6, generator=g, dtype=torch.float64)  # rows near e_0
    y = torch.randint(0, 3, (23,), generator=g)
    P = -e0 + 0.1 * torch.randn(3, 6, generator=g, dtype=torch.float64)  # proxies near −e_0
    fused, ref = both("ProxyNCALoss", 3, 6, lam=0.3, weight=1.0, softmax_scale=60.0,
                      distance=mo.distances.CosineSimilarity())
    assert_close_vg(fused(y), ref(y), x, P)
    xu, pu = F.normalize(x, dim=1), F.normalize(P, dim=1)
    args = (60.0, 0, 0.3, False, 5)
    rows = torch.ops.metrix_ops.proxy_nca_metrix_fwd(xu, pu, y, *args)
    rows32 = torch.ops.metrix_ops.proxy_nca_metrix_fwd(xu.float(), pu.float(), y, *args)
    assert torch.isfinite(rows32).all() and (rows > 0).all()
    torch.testing.assert_close(rows32.double(), rows, rtol=1e-4, atol=0)
    q = torch.rand(23, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = torch.ops.metrix_ops.proxy_nca_metrix_bwd(q, xu, pu, y, *args)
    grads32 = torch.ops.metrix_ops.proxy_nca_metrix_bwd(q.float(), xu.float(), pu.float(), y, *args)
    for a, b in zip(grads32, grads):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4 * b.abs().max())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", LOSSES)
def test_half_inputs(name, dtype):
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(40, 16, generator=g).to(dtype), torch.randint(0, 6, (40,), generator=g)
    P = proxies(6, 16, 8).to(dtype)
    fused, ref = both(name, 6, 16, lam=0.6)
    xl, Pl = x.clone().requires_grad_(True), P.clone().requires_grad_(True)
    v = fused(y)(xl, Pl)
    v.backward()
    assert v.dtype == torch.float32 and xl.grad.dtype == Pl.grad.dtype == dtype
    assert torch.isfinite(xl.grad).all() and torch.isfinite(Pl.grad).all()
    torch.testing.assert_close(v.detach(), ref(y)(x.float(), P.float()), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", LOSSES)
def test_auto_takes_the_fused_ops(name, op_calls):
    x, y = torch.randn(12, 5), torch.randint(0, 3, (12,))
    for pairs in PAIRS:
        mod = getattr(mo.losses, name)(3, 5, metrix=mo.Metrix(lam=0.5, pairs=pairs))
        mod(x, y)
    assert len(op_calls) == len(PAIRS), "backend='auto' did not take the fused Metrix ops"
    # what the fused ops do not cover goes to the reference (auto)
    op_calls.clear()
    getattr(mo.losses, name)(3, 5, metrix=mo.Metrix(lam=0.5), distance=mo.distances.LpDistance(p=2, power=1))(x, y)
    assert not op_calls


def _op_args(dtype, name, same):
    g = torch.Generator().manual_seed(3)
    x = F.normalize(torch.randn(14, 5, dtype=dtype, generator=g), dim=1).requires_grad_(True)
    p = F.normalize(torch.randn(4, 5, dtype=dtype, generator=g), dim=1).requires_grad_(True)
    y = torch.randint(0, 4, (14,), generator=g)
    if name == "ProxyAnchorLoss":
        return x, p, y, (32.0, 0.1, 0.3, same, 4)
    return x, p, y, (3.0, 0, 0.3, same, 4)


@pytest.mark.parametrize("same", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype, same):
    x, p, y, args = _op_args(dtype, "ProxyAnchorLoss", same)
    torch.library.opcheck(torch.ops.metrix_ops.proxy_anchor_metrix_fwd.default, (x, p, y, *args))
    pos, neg = torch.ops.metrix_ops.proxy_anchor_metrix_fwd(x, p, y, *args)
    g = torch.rand(4, dtype=dtype)
    torch.library.opcheck(torch.ops.metrix_ops.proxy_anchor_metrix_bwd.default,
                          (g, g, x.detach(), p.detach(), y, pos.detach(), neg.detach(), *args))
    for kind in (0, 1):
        x, p, y, (scale, _, lam, same, ch) = _op_args(dtype, "ProxyNCALoss", same)
        args = (scale, kind, lam, same, ch)
        torch.library.opcheck(torch.ops.metrix_ops.proxy_nca_metrix_fwd.default, (x, p, y, *args))
        torch.library.opcheck(torch.ops.metrix_ops.proxy_nca_metrix_bwd.default,
                              (torch.rand(14, dtype=dtype), x.detach(), p.detach(), y, *args))


def test_ops_reject_bad_input():
    x, p, y, args = _op_args(torch.float64, "ProxyAnchorLoss", False)
    fwd_pa, fwd_nca = torch.ops.metrix_ops.proxy_anchor_metrix_fwd, torch.ops.metrix_ops.proxy_nca_metrix_fwd
    with pytest.raises(RuntimeError, match="lam must be in"):
        fwd_pa(x, p, y, 32.0, 0.1, 1.5, False, 4)
    with pytest.raises(RuntimeError, match="lam must be in"):
        fwd_nca(x, p, y, 1.0, 0, -0.1, False, 4)
    with pytest.raises(RuntimeError, match="labels must be in"):
        fwd_pa(x, p, y + 4, *args)
    with pytest.raises(RuntimeError, match="labels must be int64"):
        fwd_nca(x, p, y.int(), 1.0, 0, 0.5, False, 4)
    with pytest.raises(RuntimeError, match="kind must be 0 or 1"):
        fwd_nca(x, p, y, 1.0, 2, 0.5, False, 4)
    with pytest.raises(RuntimeError, match="chunk must be > 0"):
        fwd_pa(x, p, y, 32.0, 0.1, 0.5, False, 0)
    with pytest.raises(RuntimeError, match="same dtype"):
        fwd_pa(x, p.float(), y, *args)
    pos, neg = fwd_pa(x, p, y, *args)
    short = torch.ones(3, dtype=x.dtype)
    with pytest.raises(RuntimeError, match=r"grad_pos must be of shape \(4,\)"):
        torch.ops.metrix_ops.proxy_anchor_metrix_bwd(short, pos, x, p, y, pos, neg, *args)
    with pytest.raises(RuntimeError, match=r"grad_rows must be of shape \(14,\)"):
        torch.ops.metrix_ops.proxy_nca_metrix_bwd(short, x, p, y, 1.0, 0, 0.5, False, 4)


def test_deterministic():
    """No atomics and one writer per row: two runs give the same bits (with several threads;
    across thread counts ATen's own matrix products may round differently, so those agree
    to rounding only)."""
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(90, 12, generator=g), torch.randint(0, 7, (90,), generator=g)
    P = proxies(7, 12, 9, torch.float32)
    n = torch.get_num_threads()
    try:
        runs = []
        for threads in (2, 2, 1):
            torch.set_num_threads(threads)
            runs.append([value_and_grad(loss_fn(name, 7, 12, "cpu", lam=0.4)(y), x, P)
                         for name in LOSSES])
    finally:
        torch.set_num_threads(n)
    for (va, ga), (vb, gb), (vc, gc) in zip(*runs):
        assert torch.equal(va, vb) and all(torch.equal(a, b) for a, b in zip(ga, gb))
        torch.testing.assert_close(vc, va, rtol=1e-5, atol=0)
        for a, c in zip(ga, gc):
            torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-5 * a.abs().max())
