"""torch.func and higher-order gradients on the fused losses.

PML's losses are plain PyTorch, so torch.func.grad/vjp and a gradient of a gradient work on
them. The fused ops have one derivative: one torch.func transform (grad, vjp, with
functional_call over a loss's proxies) must give the eager backward's gradient, and whatever
needs a second derivative (create_graph=True then a backward through the gradient, nested
transforms) must raise an error naming the op, never return zero (it did: the backward ops
have no autograd of their own) or fail inside an op."""
import pytest
import torch

import metrix_ops as mo
from metrix_ops import _ext
from metrix_ops.ops.autograd import call
from test_module_compile import MODULES
from triton_cases import DEVICE, requires_triton, widest_dtype

pytestmark = pytest.mark.skipif(not _ext.HAS_EXT, reason="needs the compiled extension")

# the compile sweep's modules, and the augmentations' own paths beside them
CASES = MODULES + [
    ("HPHNTripletLoss", {"expansion": mo.Expansion(n_points=3, pairs="all")}),
    ("MultiSimilarityLoss", {"metrix": mo.Metrix(lam=0.4, pairs="pos_pos")}),
    ("GeneralizedLiftedStructureLoss", {"metrix": mo.Metrix(lam=0.3)}),
]
IDS = [f"{n}-{i}" for i, (n, _) in enumerate(CASES)]


def make(name, kw):
    torch.manual_seed(0)
    return getattr(mo.losses, name)(backend="cpu", **kw).double()


def batches():
    g = torch.Generator().manual_seed(5)
    # random, no positives, one class, B = 1
    for b, k in [(13, 4), (6, 6), (7, 1), (1, 1)]:
        yield (torch.randn(b, 7, generator=g, dtype=torch.float64),
               torch.randint(0, k, (b,), generator=g))


def eager_grad(loss, x, y):
    leaf = x.clone().requires_grad_()
    return torch.autograd.grad(loss(leaf, y), leaf, allow_unused=True)[0]


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_func_grad_equals_the_eager_backward(name, kw):
    loss = make(name, kw)
    for x, y in batches():
        want = eager_grad(loss, x, y)
        got = torch.func.grad(lambda t: loss(t, y))(x)
        if want is None:  # no term depends on x (B = 1): torch.func's gradient is zeros
            want = torch.zeros_like(x)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_func_vjp_and_functional_call_over_the_proxies():
    """vjp with an upstream weight, and grad w.r.t. ProxyAnchor's proxies through
    torch.func.functional_call: the proxies' eager gradient."""
    loss = make("ProxyAnchorLoss", {"num_classes": 5, "embedding_size": 7})
    x, y = next(batches())
    y = y % 5
    value, pull = torch.func.vjp(lambda t: loss(t, y), x)
    (dx,) = pull(torch.tensor(2.5, dtype=torch.float64))
    leaf = x.clone().requires_grad_()
    want_value = loss(leaf, y)
    want_dx, want_dp = torch.autograd.grad(want_value, [leaf, loss.proxies])
    torch.testing.assert_close(value, want_value.detach(), rtol=0, atol=0)
    torch.testing.assert_close(dx, 2.5 * want_dx, rtol=0, atol=1e-12)

    params = {"proxies": loss.proxies.detach()}
    dp = torch.func.grad(lambda p: torch.func.functional_call(loss, p, (x, y)))(params)
    torch.testing.assert_close(dp["proxies"], want_dp, rtol=0, atol=1e-12)


SECOND = [
    ("MultiSimilarityLoss", {}, "metrix_ops::"),
    ("ProxyNCALoss", {"num_classes": 4, "embedding_size": 7}, "metrix_ops::"),
    ("TripletMarginLoss", {}, "metrix_ops::"),
    ("MultiSimilarityLoss", {"metrix": mo.Metrix(lam=0.3)}, "metrix_ops::"),
    ("HPHNTripletLoss", {"expansion": mo.Expansion(n_points=3, pairs="all")}, "metrix_ops::"),
]


@pytest.mark.parametrize("name,kw,op", SECOND, ids=[f"{n}-{i}" for i, (n, _, _) in
                                                     enumerate(SECOND)])
def test_a_second_derivative_raises_naming_the_op(name, kw, op):
    loss = make(name, kw)
    x, y = next(batches())
    y = y % 4
    leaf = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(loss(leaf, y), leaf, create_graph=True)
    # the first derivative under create_graph=True is the plain backward's
    torch.testing.assert_close(g.detach(), eager_grad(loss, x, y), rtol=0, atol=0)
    assert g.requires_grad
    penalty = g.square().sum()  # a gradient penalty
    with pytest.raises(RuntimeError, match=f"{op}.*no second derivative.*backend='reference'"):
        torch.autograd.grad(penalty, leaf)
    # and through a nested torch.func transform, refused at its forward
    with pytest.raises(RuntimeError, match="one torch.func transform at a time"):
        torch.func.grad(lambda t: torch.func.grad(lambda u: loss(u, y))(t).square().sum())(x)


def test_the_error_names_the_loss_op():
    """On unit rows given to the op itself, the first node a second backward reaches is the
    loss op's."""
    x = torch.nn.functional.normalize(next(batches())[0], dim=1).requires_grad_()
    y = torch.tensor([0, 1, 0, 2, 1, 1, 0, 2, 2, 0, 1, 3, 3])
    rows, _, _ = call(torch.ops.metrix_ops.ms_loss_self_fwd, x, y, 2.0, 40.0, 0.5, 4)
    (g,) = torch.autograd.grad(rows.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="metrix_ops::ms_loss_self_fwd has no second"):
        torch.autograd.grad(g.sum(), x)


def test_a_penalty_not_through_the_loss_still_works():
    """create_graph=True for another part of the graph: the fused loss's gradient enters a
    penalty only as a value (detached), which differentiates as usual."""
    loss = make("MultiSimilarityLoss", {})
    x, y = next(batches())
    w = torch.randn(7, 7, dtype=torch.float64, requires_grad=True)
    emb = x @ w
    total = loss(emb, y) + emb.square().mean()
    (g,) = torch.autograd.grad(total, w, create_graph=True)
    (gg,) = torch.autograd.grad(g.detach().mul(w).sum() + w.square().sum(), w)
    torch.testing.assert_close(gg, g.detach() + 2 * w.detach())


def test_the_reference_backend_has_the_second_derivative():
    """What the error points to: the reference's gradient penalty against finite differences
    of its first derivative."""
    loss = mo.losses.MultiSimilarityLoss(backend="reference")
    x, y = next(batches())
    x = x[:6].clone().requires_grad_()
    y = torch.tensor([0, 0, 1, 1, 2, 0])
    assert torch.autograd.gradgradcheck(lambda t: loss(t, y), (x,), eps=1e-6, atol=1e-5)


TRITON = [
    ("MultiSimilarityLoss", {}),
    ("MultiSimilarityLoss", {"metrix": mo.Metrix(lam=0.3)}),
    # EE through the ops with a Tensor[] argument (the layout tables)
    ("MultiSimilarityLoss", {"expansion": mo.Expansion(n_points=3, pairs="all")}),
    ("TripletMarginLoss", {"expansion": mo.Expansion(n_points=3, pairs="all")}),
]


@requires_triton
@pytest.mark.parametrize("name,kw", TRITON, ids=[f"{n}-{i}" for i, (n, _) in enumerate(TRITON)])
def test_triton_engine_under_func_grad(name, kw):
    """The Triton engine's ops (torch.library.custom_op) take the same two paths: one
    transform gives the eager gradient, a second derivative raises."""
    check_gpu_engine("triton", name, kw, DEVICE, widest_dtype()[0])


@pytest.mark.skipif(not (torch.cuda.is_available() and _ext.HAS_CUDA_EXT),
                    reason="needs a GPU and the CUDA extension")
@pytest.mark.parametrize("name,kw", TRITON[:2], ids=["clean", "metrix"])
def test_cuda_engine_under_func_grad(name, kw):
    check_gpu_engine("cuda", name, kw, torch.device("cuda"), torch.float32)


def check_gpu_engine(backend, name, kw, device, dtype):
    loss = getattr(mo.losses, name)(backend=backend, **kw)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(12, 8, generator=g, dtype=dtype).to(device)
    y = torch.randint(0, 3, (12,), generator=g).to(device)
    want = eager_grad(loss, x, y)
    got = torch.func.grad(lambda t: loss(t, y))(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    leaf = x.clone().requires_grad_()
    (dx,) = torch.autograd.grad(loss(leaf, y), leaf, create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(dx.square().sum(), leaf)


def test_host_reads_inside_a_transform():
    """The package's host reads (data checks, sizes) read through torch.func's wrappers:
    torch < 2.5 cannot read a wrapped tensor's data at all."""
    from metrix_ops.host_read import host_list, unwrapped
    seen = {}

    def f(t):
        inner = unwrapped(t)
        seen["wrapped"] = torch._C._functorch.is_functorch_wrapped_tensor(t)
        seen["plain"] = not torch._C._functorch.is_functorch_wrapped_tensor(inner)
        seen["values"] = host_list(t[:3])
        return t.sum()

    x = torch.tensor([1.5, -2.0, 3.25, 4.0], dtype=torch.float64)
    torch.func.grad(f)(x)
    assert seen == {"wrapped": True, "plain": True, "values": [1.5, -2.0, 3.25]}
