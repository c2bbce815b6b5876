"""backend="cuda" for ProxyAnchorLoss and ProxyNCALoss with embedding-level Metrix
(csrc/cuda/proxy_metrix_cuda.cu: the CPU ops' schemas, Gram rows in blocks, one writer per
output entry) against the reference (closed-form candidates over a dense K × C matrix) and
the CPU ops: values and gradients in the embeddings and the proxies over the shared cases,
every `pairs`, λ at and inside [0, 1], ProxyNCA's two metrics and ProxyNCA++'s temperature,
ProxyAnchor's α and δ; the ops against the CPU ops in fp64 with unequal upstream weights and
Gram blocks of 1 to 64 rows; fp32 and bf16; opcheck; bad input; that the module uses the op.
Skipped without a GPU and the compiled CUDA kernels."""
import pytest
import torch
import torch.nn.functional as F

import metrix_ops as mo
from cases import CASE_IDS, CASES, assert_close_vg, make_case
from metrix_ops import _ext

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and _ext.HAS_CUDA_EXT),
                                reason="needs a CUDA device and the compiled CUDA kernels")

LOSSES = ["ProxyNCALoss", "ProxyAnchorLoss"]


@pytest.fixture(autouse=True)
def _fp32_products(no_tf32):  # conftest.py
    pass


def pair(c, d, lam, pairs="pos_neg", cosine=False, dtype=torch.float64, loss="ProxyNCALoss",
         **kw):
    cfg = mo.Metrix(level="embedding", pairs=pairs, lam=lam, weight=0.7)
    if cosine and loss == "ProxyNCALoss":
        kw["distance"] = mo.distances.CosineSimilarity()
    cls = getattr(mo.losses, loss)
    fused = cls(c, d, backend="cuda", metrix=cfg, **kw).to("cuda", dtype)
    ref = cls(c, d, backend="reference", metrix=cfg, **kw).to("cuda", dtype)
    ref.load_state_dict(fused.state_dict())
    return fused, ref


@pytest.fixture(params=LOSSES)
def loss(request):
    return request.param


@pytest.fixture
def op_calls(monkeypatch):
    """How many times the module reached a CUDA proxy Metrix op."""
    import metrix_ops.fused.cuda_proxy_metrix as cpm
    calls = []
    for fn in ("anchor_terms_cuda", "nca_rows_cuda"):
        real = getattr(cpm, fn)
        monkeypatch.setattr(cpm, fn, lambda *a, real=real, **k: calls.append(1) or real(*a, **k))
    return calls


def check(fused, ref, x, y):
    """Values and gradients in the embeddings and in the proxies."""
    assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x)
    fused.zero_grad()
    ref.zero_grad()
    fused(x.detach(), y).backward()
    ref(x.detach(), y).backward()
    torch.testing.assert_close(fused.proxies.grad, ref.proxies.grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("pairs,lam", [("pos_neg", 0.3), ("pos_pos", 0.6), ("anchor_neg", 0.0),
                                       ("neg_neg", 1.0)])
def test_matches_reference_fp64(loss, case, pairs, lam, op_calls):
    x, y = make_case(case)
    x, y = x.detach().cuda().requires_grad_(), y.cuda()
    c = int(y.max()) + 2  # a proxy without examples too
    fused, ref = pair(c, x.shape[1], lam, pairs, cosine=(pairs == "pos_pos"), loss=loss)
    check(fused, ref, x, y)
    assert op_calls


@pytest.mark.parametrize("b,c,d", [(40, 37, 9), (300, 70, 5)])
@pytest.mark.parametrize("cosine", [False, True])
def test_sizes_and_settings(loss, b, c, d, cosine, op_calls):
    """Rows beyond one warp's 32 partners and one block's 256; several proxies per row."""
    g = torch.Generator().manual_seed(b + c)
    x = torch.randn(b, d, dtype=torch.float64, generator=g).cuda().requires_grad_()
    y = torch.randint(0, min(c, 9), (b,), generator=g).cuda()
    kw = (dict(softmax_scale=3.0, temperature=0.5) if loss == "ProxyNCALoss"
          else dict(alpha=16.0 if cosine else 32.0, margin=0.2))
    fused, ref = pair(c, d, 0.45, cosine=cosine, loss=loss, **kw)
    check(fused, ref, x, y)
    assert op_calls


def _units(b, c, d, seed, classes):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(b, d, dtype=torch.float64, generator=g), dim=1)
    x[1] = x[0]  # a duplicate and an antipode: the mix's norm at 1 and at 0
    x[2] = -x[0]
    p = F.normalize(torch.randn(c, d, dtype=torch.float64, generator=g), dim=1)
    y = torch.randint(0, classes, (b,), generator=g)
    y[2] = (y[0] + 1) % classes
    return x, p, y, g


def _compare(cpu_fn, cuda_fn, weights, x, p):
    """Weighted outputs and their gradients in x and p, CPU op against CUDA op."""
    def run(fn, dev):
        leaves = [t.to(dev).clone().requires_grad_() for t in (x, p)]
        out = fn(*leaves)
        out = out if isinstance(out, tuple) else (out,)
        v = sum((o * w.to(dev)).sum() for o, w in zip(out, weights))
        return [o.detach().cpu() for o in out], [t.cpu() for t in torch.autograd.grad(v, leaves)]
    (oa, ga), (ob, gb) = run(cpu_fn, "cpu"), run(cuda_fn, "cuda")
    for a, b in zip(oa + ga, ob + gb):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("chunk", [1, 3, 64])
@pytest.mark.parametrize("same", [False, True])
@pytest.mark.parametrize("lam", [0.0, 0.35, 0.6, 1.0])  # not ½: x[2] = −x[0] (a zero mix)
def test_anchor_op_matches_the_cpu_op(chunk, same, lam):
    from metrix_ops.ops.proxy_metrix import proxy_anchor_metrix_terms
    x, p, y, g = _units(45, 7, 6, 3, 5)
    w = [torch.randn(7, dtype=torch.float64, generator=g) for _ in range(2)]

    def op(dev_chunk):
        return lambda xx, pp: proxy_anchor_metrix_terms(xx, pp, y.to(xx.device), 32.0, 0.1, lam,
                                                        same, dev_chunk)
    _compare(op(8), op(chunk), w, x, p)


@pytest.mark.parametrize("chunk", [1, 3, 64])
@pytest.mark.parametrize("kind,same", [(0, False), (1, False), (1, True)])
@pytest.mark.parametrize("lam", [0.0, 0.35, 1.0])
def test_nca_op_matches_the_cpu_op(chunk, kind, same, lam):
    from metrix_ops.ops.proxy_metrix import proxy_nca_metrix_rows
    x, p, y, g = _units(45, 7, 6, 4, 5)
    w = [torch.randn(45, dtype=torch.float64, generator=g)]

    def op(dev_chunk):
        return lambda xx, pp: proxy_nca_metrix_rows(xx, pp, y.to(xx.device), 2.5, kind, lam,
                                                    same, dev_chunk)
    _compare(op(8), op(chunk), w, x, p)


def test_fp32_and_bf16(loss):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(33, 12, generator=g).cuda()
    y = torch.randint(0, 6, (33,), generator=g).cuda()
    fused, ref = pair(6, 12, 0.3, dtype=torch.float32, loss=loss)
    assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x, rtol=1e-4, atol=1e-5)
    h = x.detach().bfloat16().requires_grad_()
    v = fused(h, y)
    v.backward()
    assert torch.isfinite(h.grad.float()).all()
    torch.testing.assert_close(v.float(), ref(h.detach().float(), y).float(), rtol=1e-3,
                               atol=1e-3)


def test_opcheck():
    x = F.normalize(torch.randn(11, 4, dtype=torch.float64), dim=1).cuda()
    p = F.normalize(torch.randn(5, 4, dtype=torch.float64), dim=1).cuda()
    y = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 0], device="cuda")
    ops = torch.ops.metrix_ops
    for kind, same in ((0, False), (1, True)):
        args = (x.clone().requires_grad_(), p.clone().requires_grad_(), y, 2.0, kind, 0.4, same, 3)
        torch.library.opcheck(ops.proxy_nca_metrix_fwd.default, args)
        args = (x.clone().requires_grad_(), p.clone().requires_grad_(), y, 32.0, 0.1, 0.4, same, 3)
        torch.library.opcheck(ops.proxy_anchor_metrix_fwd.default, args)


def test_bad_input_names_the_argument():
    x = F.normalize(torch.randn(6, 4), dim=1).cuda()
    p = F.normalize(torch.randn(3, 4), dim=1).cuda()
    y = torch.tensor([0, 0, 1, 1, 2, 2], device="cuda")
    pa, nca = torch.ops.metrix_ops.proxy_anchor_metrix_fwd, torch.ops.metrix_ops.proxy_nca_metrix_fwd
    with pytest.raises(RuntimeError, match="lam must be in"):
        pa(x, p, y, 32.0, 0.1, 1.5, False, 4)
    with pytest.raises(RuntimeError, match="labels must be in"):
        nca(x, p, y + 1, 2.0, 0, 0.3, False, 4)
    with pytest.raises(RuntimeError, match="kind must be"):
        nca(x, p, y, 2.0, 3, 0.3, False, 4)
    with pytest.raises(RuntimeError, match="one device"):
        pa(x, p.cpu(), y, 32.0, 0.1, 0.3, False, 4)
    with pytest.raises(RuntimeError, match="chunk must be"):
        nca(x, p, y, 2.0, 0, 0.3, False, 0)


def test_empty_batch(loss):
    fused, _ = pair(4, 5, 0.3, dtype=torch.float32, loss=loss)
    x = torch.zeros(0, 5, device="cuda", requires_grad=True)
    v = fused(x, torch.zeros(0, dtype=torch.long, device="cuda"))
    v.backward()
    assert v.item() == 0 and x.grad.shape == (0, 5)
