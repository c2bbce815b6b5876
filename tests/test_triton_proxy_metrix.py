"""ProxyNCALoss and ProxyAnchorLoss with embedding-level Metrix on the Triton engine
(triton/proxy_nca_metrix.py, proxy_anchor_metrix.py: candidate tiles over (rows, partners,
proxies), both candidate orders in the backward) against the reference (closed-form
candidates over a dense K × C matrix): values and gradients in the embeddings and the proxies
over the shared cases, every `pairs`, λ at and inside [0, 1], ProxyNCA's two metrics (PML's
squared L2 and cosine) and ProxyNCA++'s temperature, ProxyAnchor's α and δ, shapes over
several row, partner and proxy tiles; the ops against the CPU ops with unequal upstream
weights; fp32 and half inputs; opcheck; sm_90 compilation.

Without a GPU these run under TRITON_INTERPRET=1 on CPU tensors."""
import pytest
import torch
import torch.nn.functional as F

import metrix_ops as mo
from cases import CASE_IDS, CASES, assert_close_vg, make_case
from metrix_ops import _ext
from triton_cases import DEVICE, compiles_only, on_dev, requires_triton, run_sm90_script

pytestmark = requires_triton


LOSSES = ["ProxyNCALoss", "ProxyAnchorLoss"]


def pair(c, d, lam, pairs="pos_neg", cosine=False, dtype=torch.float64, loss="ProxyNCALoss",
         **kw):
    cfg = mo.Metrix(level="embedding", pairs=pairs, lam=lam, weight=0.7)
    if cosine and loss == "ProxyNCALoss":
        kw["distance"] = mo.distances.CosineSimilarity()
    cls = getattr(mo.losses, loss)
    tri = cls(c, d, backend="triton", metrix=cfg, **kw).to(DEVICE, dtype)
    ref = cls(c, d, backend="reference", metrix=cfg, **kw).to(DEVICE, dtype)
    ref.load_state_dict(tri.state_dict())
    return tri, ref


@pytest.fixture(params=LOSSES)
def loss(request):
    return request.param


@pytest.fixture
def op_calls(monkeypatch, loss):
    import metrix_ops.triton.proxy_anchor_metrix as pa
    import metrix_ops.triton.proxy_nca_metrix as nca
    mod, fn = ((nca, "proxy_nca_metrix_rows_triton") if loss == "ProxyNCALoss"
               else (pa, "proxy_anchor_metrix_terms_triton"))
    calls, real = [], getattr(mod, fn)
    monkeypatch.setattr(mod, fn, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def check(tri, ref, x, y):
    """Values and gradients in the embeddings and in the proxies."""
    def run(loss):
        def f(e):
            return loss(e, y)
        return f
    assert_close_vg(run(tri), run(ref), x)
    tri.zero_grad()
    ref.zero_grad()
    tri(x.detach(), y).backward()
    ref(x.detach(), y).backward()
    torch.testing.assert_close(tri.proxies.grad, ref.proxies.grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("pairs,lam", [("pos_neg", 0.3), ("pos_pos", 0.6), ("anchor_neg", 0.0),
                                       ("neg_neg", 1.0)])
def test_matches_reference_fp64(loss, case, pairs, lam, op_calls):
    x, y = on_dev(*make_case(case))
    c = int(y.max()) + 2  # a proxy without examples too
    tri, ref = pair(c, x.shape[1], lam, pairs, cosine=(pairs == "pos_pos"), loss=loss)
    check(tri, ref, x, y)
    assert op_calls


@pytest.mark.parametrize("b,c,d", [(40, 37, 9), (17, 70, 5)])
@pytest.mark.parametrize("cosine", [False, True])
def test_tiles_and_settings(loss, b, c, d, cosine, op_calls):
    g = torch.Generator().manual_seed(b + c)
    x = torch.randn(b, d, dtype=torch.float64, generator=g)
    y = torch.randint(0, min(c, 9), (b,), generator=g)
    x, y = on_dev(x, y)
    kw = (dict(softmax_scale=3.0, temperature=0.5) if loss == "ProxyNCALoss"
          else dict(alpha=16.0 if cosine else 32.0, margin=0.2))
    tri, ref = pair(c, d, 0.45, cosine=cosine, loss=loss, **kw)
    check(tri, ref, x, y)
    assert op_calls


@pytest.mark.skipif(not _ext.HAS_EXT, reason="the CPU op is the oracle here")
@pytest.mark.parametrize("kind,same", [(0, False), (1, True)])
def test_rows_with_unequal_weights_match_the_cpu_op(kind, same):
    """Each row's upstream weight differs: both candidate orders' weights (g_u and g_w)."""
    from metrix_ops.ops.proxy_metrix import proxy_nca_metrix_rows
    from metrix_ops.triton.proxy_nca_metrix import proxy_nca_metrix_rows_triton
    g = torch.Generator().manual_seed(kind)
    x = F.normalize(torch.randn(26, 6, dtype=torch.float64, generator=g), dim=1)
    p = F.normalize(torch.randn(7, 6, dtype=torch.float64, generator=g), dim=1)
    y = torch.randint(0, 5, (26,), generator=g)
    w = torch.randn(26, dtype=torch.float64, generator=g)
    cpu = [t.clone().requires_grad_() for t in (x, p)]
    v_cpu = (proxy_nca_metrix_rows(*cpu, y, 2.5, kind, 0.35, same) * w).sum()
    d_cpu = torch.autograd.grad(v_cpu, cpu)
    tri = [t.requires_grad_() for t in on_dev(x, p)]
    yd, wd = on_dev(y, w)
    v_tri = (proxy_nca_metrix_rows_triton(*tri, yd, 2.5, kind, 0.35, same) * wd).sum()
    d_tri = torch.autograd.grad(v_tri, tri)
    torch.testing.assert_close(v_tri.cpu(), v_cpu, rtol=1e-10, atol=1e-10)
    for a, b in zip(d_tri, d_cpu):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-8, atol=1e-10)


@pytest.mark.skipif(not _ext.HAS_EXT, reason="the CPU op is the oracle here")
@pytest.mark.parametrize("same", [False, True])
def test_anchor_terms_with_unequal_weights_match_the_cpu_op(same):
    """Each proxy's two upstream weights differ, through both candidate orders."""
    from metrix_ops.ops.proxy_metrix import proxy_anchor_metrix_terms
    from metrix_ops.triton.proxy_anchor_metrix import proxy_anchor_metrix_terms_triton
    g = torch.Generator().manual_seed(7 + same)
    x = F.normalize(torch.randn(26, 6, dtype=torch.float64, generator=g), dim=1)
    p = F.normalize(torch.randn(7, 6, dtype=torch.float64, generator=g), dim=1)
    y = torch.randint(0, 5, (26,), generator=g)
    wp, wn = (torch.randn(7, dtype=torch.float64, generator=g) for _ in range(2))

    def weighted(terms):
        return (terms[0] * wp).sum() + (terms[1] * wn).sum()
    cpu = [t.clone().requires_grad_() for t in (x, p)]
    v_cpu = weighted(proxy_anchor_metrix_terms(*cpu, y, 32.0, 0.1, 0.35, same))
    d_cpu = torch.autograd.grad(v_cpu, cpu)
    tri = [t.requires_grad_() for t in on_dev(x, p)]
    yd, wp, wn = on_dev(y, wp, wn)
    v_tri = weighted(proxy_anchor_metrix_terms_triton(*tri, yd, 32.0, 0.1, 0.35, same))
    d_tri = torch.autograd.grad(v_tri, tri)
    torch.testing.assert_close(v_tri.cpu(), v_cpu, rtol=1e-10, atol=1e-10)
    for a, b in zip(d_tri, d_cpu):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-8, atol=1e-8)


def _anchor_terms_by_formula(x, p, y, alpha, margin, lam, same):
    """ProxyAnchor's mixed terms straight from the formula, in fp64 by autograd: every
    candidate mix(u, w) as a unit point, its cosines to the proxies, the class masses, and
    log(1 + Σ) as a log-sum-exp with the "1 +" as one more exponent of 0."""
    b = x.shape[0]
    u, w = torch.meshgrid(torch.arange(b), torch.arange(b), indexing="ij")
    keep = (u != w) & ((y[u] == y[w]) if same else (y[u] != y[w]))
    u, w = u[keep], w[keep]
    mixed = F.normalize(lam * x[u] + (1 - lam) * x[w], dim=1)
    s = mixed @ p.t()
    cls = torch.arange(p.shape[0])
    mass = lam * (y[u, None] == cls).double() + (1 - lam) * (y[w, None] == cls).double()

    def log1p_sum(a, wgt):
        a = torch.where(wgt > 0, a + torch.log(wgt.clamp_min(1e-300)), float("-inf"))
        return torch.logsumexp(torch.cat([a, torch.zeros(1, a.shape[1], dtype=a.dtype)]), 0)
    return (log1p_sum(-alpha * (s - margin), mass),
            log1p_sum(alpha * (s + margin), 1 - mass))


@pytest.mark.parametrize("same", [False, True])
def test_anchor_terms_merge_row_tiles_past_fp32_range(same):
    """The forward's row programs each keep a (max, sum) pair per proxy, merged afterwards:
    α(1 + δ) = 96 puts e^a past fp32's range, and rows 16–31 (the second row tile) are
    singletons, so under pairs="pos_pos" that tile has no candidate at all. fp32 against the
    formula in fp64, values and gradients under unequal upstream weights. The op takes unit
    rows and leaves the radial part of their gradient to the normalisation before it (as the
    losses call it), so both sides start from raw rows."""
    from metrix_ops.triton.proxy_anchor_metrix import proxy_anchor_metrix_terms_triton
    g = torch.Generator().manual_seed(31 + same)
    x = torch.randn(40, 7, dtype=torch.float64, generator=g)
    p = torch.randn(21, 7, dtype=torch.float64, generator=g)
    y = torch.cat([torch.randint(0, 2, (16,), generator=g), torch.arange(2, 18),
                   torch.randint(0, 2, (8,), generator=g)])
    wp, wn = (torch.rand(21, dtype=torch.float64, generator=g) + 0.5 for _ in range(2))
    alpha, margin, lam = 64.0, 0.5, 0.3
    ref = [t.clone().requires_grad_() for t in (x, p)]
    pos, neg = _anchor_terms_by_formula(*(F.normalize(t, dim=1) for t in ref), y, alpha,
                                        margin, lam, same)
    assert pos.max() > 89 or neg.max() > 89  # e^89 > fp32's largest
    d_ref = torch.autograd.grad((pos * wp).sum() + (neg * wn).sum(), ref)
    tri = [t.float().requires_grad_() for t in on_dev(x, p)]
    yd, wpd, wnd = on_dev(y, wp.float(), wn.float())
    tp, tn = proxy_anchor_metrix_terms_triton(*(F.normalize(t, dim=1) for t in tri), yd,
                                              alpha, margin, lam, same)
    d_tri = torch.autograd.grad((tp * wpd).sum() + (tn * wnd).sum(), tri)
    assert tp.dtype == torch.float32
    torch.testing.assert_close(tp.cpu().double(), pos.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(tn.cpu().double(), neg.detach(), rtol=1e-5, atol=1e-4)
    for a, b in zip(d_tri, d_ref):
        torch.testing.assert_close(a.cpu().double(), b, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("same", [False, True])
def test_anchor_terms_rows_without_a_proxy(same):
    """The kernels address S_P and the proxy tables by label: a label outside [0, C) (which
    the losses refuse before, but the op does not read the host to check) must read no
    memory out of range and meet no proxy, as in the formula, where its mass is on none."""
    from metrix_ops.triton.proxy_anchor_metrix import proxy_anchor_metrix_terms_triton
    g = torch.Generator().manual_seed(5 + same)
    x = F.normalize(torch.randn(19, 5, dtype=torch.float64, generator=g), dim=1)
    p = F.normalize(torch.randn(4, 5, dtype=torch.float64, generator=g), dim=1)
    y = torch.tensor([0, 1, 2, 3, 4, 4, 9, 9, 0, 1, 2, 3, 0, 1, 9, 2, 3, 4, 0])
    wp, wn = (torch.rand(4, dtype=torch.float64, generator=g) for _ in range(2))
    ref = [x.clone().requires_grad_(), p.clone().requires_grad_()]
    pos, neg = _anchor_terms_by_formula(*ref, y, 32.0, 0.1, 0.4, same)
    d_ref = torch.autograd.grad((pos * wp).sum() + (neg * wn).sum(), ref)
    tri = [t.requires_grad_() for t in on_dev(x, p)]
    yd, wpd, wnd = on_dev(y, wp, wn)
    tp, tn = proxy_anchor_metrix_terms_triton(*tri, yd, 32.0, 0.1, 0.4, same)
    d_tri = torch.autograd.grad((tp * wpd).sum() + (tn * wnd).sum(), tri)
    torch.testing.assert_close(tp.cpu(), pos.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(tn.cpu(), neg.detach(), rtol=1e-10, atol=1e-10)
    # the op's row gradient leaves out the radial part (unit rows): compare the tangent part
    tangent = d_tri[0].cpu() - (d_tri[0].cpu() * x).sum(1, keepdim=True) * x
    torch.testing.assert_close(tangent, d_ref[0] - (d_ref[0] * x).sum(1, keepdim=True) * x,
                               rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(d_tri[1].cpu(), d_ref[1], rtol=1e-8, atol=1e-8)


def test_fp32_and_half_inputs(loss):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(33, 12, generator=g)
    y = torch.randint(0, 6, (33,), generator=g)
    x, y = on_dev(x, y)
    tri, ref = pair(6, 12, 0.3, dtype=torch.float32, loss=loss)
    assert_close_vg(lambda e: tri(e, y), lambda e: ref(e, y), x, rtol=1e-4, atol=1e-5)
    h = x.detach().half().requires_grad_()
    v = tri(h, y)
    v.backward()
    assert torch.isfinite(h.grad).all()
    torch.testing.assert_close(v.float(), ref(h.detach().float(), y).float(), rtol=1e-3,
                               atol=1e-3)


def test_opcheck():
    x = F.normalize(torch.randn(11, 4, dtype=torch.float64), dim=1).to(DEVICE)
    p = F.normalize(torch.randn(5, 4, dtype=torch.float64), dim=1).to(DEVICE)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 0], device=DEVICE)
    ops = torch.ops.metrix_ops
    for kind, same in ((0, False), (1, True)):
        args = (x.clone().requires_grad_(), p.clone().requires_grad_(), y, 2.0, kind, 0.4, same)
        torch.library.opcheck(ops.triton_proxy_nca_metrix_rows.default, args)
        gr = torch.randn(11, dtype=torch.float64, device=DEVICE)
        torch.library.opcheck(ops.triton_proxy_nca_metrix_rows_bwd.default,
                              (gr, x, p, y, 2.0, kind, 0.4, same))
        args = (x.clone().requires_grad_(), p.clone().requires_grad_(), y, 32.0, 0.1, 0.4,
                same)
        torch.library.opcheck(ops.triton_proxy_anchor_metrix_terms.default, args)
        pos, neg = ops.triton_proxy_anchor_metrix_terms(x, p, y, 32.0, 0.1, 0.4, same)
        gp, gn = (torch.randn(5, dtype=torch.float64, device=DEVICE) for _ in range(2))
        torch.library.opcheck(ops.triton_proxy_anchor_metrix_terms_bwd.default,
                              (gp, gn, x, p, y, pos, neg, 32.0, 0.1, 0.4, same))


_SM90 = r'''
import metrix_ops.triton.proxy_nca_metrix as m
import metrix_ops.triton.proxy_anchor_metrix as pa

failed = []
ptrs = {"y_ptr": "*i64"}
for fdt, acc, prec in [("fp32", tl.float32, "tf32"), ("fp64", tl.float64, "ieee")]:
    for kind in (0, 1):
        consts = dict(BLOCK_U=16, BLOCK_W=16, BLOCK_C=16, BLOCK_D=64, ACC=acc, PRECISION=prec,
                      SAME=False, KIND=kind, BLOCK_DO=512)
        for fn in (m._nca_mix_fwd_kernel, m._nca_mix_bwd_kernel, pa._pa_mix_fwd_kernel,
                   pa._pa_mix_bwd_kernel):
            cc = {k: v for k, v in consts.items() if k in fn.arg_names}
            try:
                compile_sm90(fn, cc, fdt, num_warps=4, pointer_types=ptrs)
            except Exception as e:  # noqa: BLE001
                failed.append(f"{fn.__name__} {fdt} kind={kind}: {type(e).__name__}: {str(e)[:300]}")
print("\n".join(failed))
sys.exit(1 if failed else 0)
'''


@compiles_only
def test_kernels_compile_for_h100():
    run_sm90_script(_SM90)
