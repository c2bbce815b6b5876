"""Under autocast (a mixed-precision training step) a fused loss computes in fp32 and gives
what it gives outside autocast for the same half-precision embeddings; the reference keeps
autocast's half-precision products, as PML does."""
import pytest
import torch

import metrix_ops as mo
from metrix_ops import _ext, backend

pytestmark = pytest.mark.skipif(not _ext.HAS_EXT, reason="compiled extension not built")

CASES = [("MultiSimilarityLoss", {}), ("MultiSimilarityLoss", {"metrix": mo.Metrix(lam=0.3)}),
         ("ContrastiveLoss", {}), ("TripletMarginLoss", {}), ("HPHNTripletLoss", {}),
         ("HPHNTripletLoss", {"expansion": mo.Expansion(n_points=3)}),
         ("ProxyAnchorLoss", {}), ("ProxyNCALoss", {})]


def _make(name, kw, dim, classes):
    args = (classes, dim) if name.startswith("Proxy") else ()
    torch.manual_seed(3)  # the same proxies for both modules
    return getattr(mo.losses, name)(*args, backend="auto", **kw)


def _loss_and_grad(module, x, y, dtype=None):
    x = x.detach().clone().requires_grad_(True)
    if dtype is None:
        out = module(x, y)
    else:
        with torch.autocast("cpu", dtype=dtype):
            out = module(x, y)
    (g,) = torch.autograd.grad(out, x)
    return out.detach().float(), g.float()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,kw", CASES, ids=[f"{n}-{'+'.join(k) or 'clean'}" for n, k in CASES])
def test_fused_loss_under_autocast_equals_it_outside(name, kw, dtype):
    assert name in backend.FUSED["cpu"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(29, 12, generator=g).to(dtype)
    y = torch.randint(0, 5, (29,), generator=g)
    inside = _loss_and_grad(_make(name, kw, 12, 5), x, y, dtype)
    outside = _loss_and_grad(_make(name, kw, 12, 5), x, y)
    assert inside[0].dtype == torch.float32 and inside[0].item() > 0
    torch.testing.assert_close(inside[0], outside[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(inside[1], outside[1], rtol=1e-3, atol=1e-5)


def test_cross_batch_memory_under_autocast():
    def run(dtype):
        torch.manual_seed(0)
        m = mo.losses.CrossBatchMemory(mo.losses.MultiSimilarityLoss(backend="auto"), 8,
                                       memory_size=40)
        outs = []
        for step in range(3):
            x = torch.randn(16, 8).bfloat16()
            y = torch.randint(0, 4, (16,))
            outs.append(_loss_and_grad(m, x, y, dtype))
        return outs

    for a, b in zip(run(torch.bfloat16), run(None)):
        torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a[1], b[1], rtol=1e-3, atol=1e-5)
