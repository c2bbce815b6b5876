"""The fused engines' row normalisation (ops/unit_rows.py) against F.normalize, value and
gradient, over odd shapes, zero and tiny rows (F.normalize's eps clamp), huge rows, fp64,
fp32, bf16, gradcheck and torch.compile; the compiled CPU op (fp32/fp64) against the
PyTorch form it replaces, on strided inputs and gradients, and its schema (opcheck); and the
one-pass finiteness check of the inputs."""
import pytest
import torch
import torch.nn.functional as F

from metrix_ops.distances import CosineSimilarity, LpDistance
from metrix_ops.ops import unit_rows as unit_rows_mod
from metrix_ops.ops.unit_rows import HAS_CPU_OP, normalized, unit_rows
from metrix_ops.validation import DataChecks


def rows(b, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    if b >= 4:
        x[1] = 0  # clamped: F.normalize gives 0 and the gradient g / eps
        x[2] *= 1e-14  # below eps too
        x[3] *= 1e15  # far above 1
    return x.to(dtype), torch.randn(b, d, generator=g, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5),
                                       (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("b,d", [(1, 1), (1, 7), (5, 1), (13, 3), (37, 64), (0, 5)])
def test_equals_f_normalize(b, d, dtype, tol):
    x, g = rows(b, d, dtype)
    a, r = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yr = unit_rows(a), F.normalize(r, dim=1)
    torch.testing.assert_close(ya, yr, rtol=tol, atol=0)
    ya.backward(g)
    yr.backward(g)
    # per row, the gradient's natural size |g| / ‖x‖ (rows differ by 1e29; a row of D = 1 has
    # a zero gradient, up to rounding)
    norm = torch.linalg.vector_norm(x.double(), dim=1, keepdim=True).clamp_min(1e-12)
    scale = (g.double().abs().amax(1, keepdim=True) / norm).clamp_min(1e-30).to(dtype)
    torch.testing.assert_close(a.grad / scale, r.grad / scale, rtol=0, atol=tol)


def test_gradcheck_and_second_call():
    x, _ = rows(6, 4, torch.float64, seed=3)
    x = x[4:].clone().requires_grad_()  # rows away from the clamp, where the map is smooth
    assert torch.autograd.gradcheck(unit_rows, (x,))


def test_under_fullgraph_compile():
    x, g = rows(9, 5, torch.float32, seed=4)
    f = torch.compile(lambda t: (unit_rows(t) * g).sum(), fullgraph=True)
    a, r = x.clone().requires_grad_(), x.clone().requires_grad_()
    f(a).backward()
    (F.normalize(r, dim=1) * g).sum().backward()
    torch.testing.assert_close(a.grad, r.grad, rtol=1e-5, atol=1e-6)


def test_normalized_follows_the_distance():
    x, _ = rows(5, 3, torch.float64)
    torch.testing.assert_close(normalized(CosineSimilarity(), x), F.normalize(x, dim=1))
    torch.testing.assert_close(normalized(LpDistance(p=1), x), F.normalize(x, p=1, dim=1))
    assert normalized(LpDistance(normalize_embeddings=False), x) is x


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_data_checks_finite_short_rows_and_ranges(dtype):
    """DataChecks' one read: finite values however large pass, a NaN or an Inf anywhere
    raises naming the tensor; a row under F.normalize's eps is flagged (not a small one that
    normalises); an index range check names the bound; several checks in one read."""
    def read(*adds):
        c = DataChecks()
        for add in adds:
            add(c)
        return c.read()

    big = torch.finfo(dtype).max
    x = torch.tensor([[1.0, -big], [big, 0.0], [1e-3, 0.0]], dtype=dtype)  # finite, large
    assert read(lambda c: c.finite(x, "x")) is False
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[1, 1] = bad
        with pytest.raises(ValueError, match="y contains NaN or Inf"):
            read(lambda c: c.finite(x, "x"), lambda c: c.finite(y, "y"))
    assert read(lambda c: c.short_rows(x[2:], "x")) is False
    z = x.clone()
    z[2] = 0
    assert read(lambda c: c.finite(x, "x"), lambda c: c.short_rows(z, "z")) is True
    idx = torch.tensor([0, 4, 2**40 + 1])
    assert read(lambda c: c.within(idx, 2**40 + 2, "i")) is False
    with pytest.raises(ValueError, match=r"i past, got values in \[0, 1099511627777\]"):
        read(lambda c: c.short_rows(x, "x"), lambda c: c.within(idx, 2**40 + 1, "i past"))
    with pytest.raises(ValueError, match=r"neg, got values in \[-1, 4\]"):
        read(lambda c: c.within(torch.tensor([4, -1]), 9, "neg"))


def test_backward_inside_autocast_stays_fp32():
    """A backward called inside a bf16 autocast region (the fused losses compute in fp32
    there) gives the fp32 gradient, not a bf16 vecdot's."""
    x, g = rows(21, 12, torch.float32, seed=5)
    a, r = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (ga,) = torch.autograd.grad((unit_rows(a) * g).sum(), a)
    (gr,) = torch.autograd.grad((unit_rows(r) * g).sum(), r)
    assert ga.dtype == torch.float32
    torch.testing.assert_close(ga, gr, rtol=1e-6, atol=1e-7)


needs_op = pytest.mark.skipif(not HAS_CPU_OP, reason="the compiled CPU op is not built")


@needs_op
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("b,d", [(1, 1), (4, 9), (19, 1), (33, 130)])
def test_cpu_op_matches_the_pytorch_form(b, d, dtype, monkeypatch):
    """The op on a strided input (a column slice of a wider tensor) and an expanded incoming
    gradient (stride 0), against the PyTorch form on the same tensors: fp32/fp64 CPU tensors
    take the op, so F.normalize's comparison above tests it; this checks that the two forms of
    the one formula agree and that the op reads any strides."""
    x, g = rows(b, d + 3, dtype, seed=b)
    x, g0 = x[:, 2:2 + d], g[:1, :d]
    g = g0.expand(b, d)
    assert b == 1 or (not x.is_contiguous() and g.stride(0) == 0)  # one row is contiguous
    assert unit_rows_mod.cpu_op(x)

    def run():
        a = x.detach().requires_grad_()
        y = unit_rows(a)
        (dx,) = torch.autograd.grad(y, a, g)
        return y, dx

    y_op, dx_op = run()
    monkeypatch.setattr(unit_rows_mod, "cpu_op", lambda t: False)
    y_pt, dx_pt = run()
    tol = 1e-14 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(y_op, y_pt, rtol=tol, atol=tol)
    # rows of 1e15 and of 1e-14 in one tensor: compare each row at its own scale
    scale = dx_pt.abs().amax(1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    torch.testing.assert_close(dx_op / scale, dx_pt / scale, rtol=0, atol=tol)


@needs_op
def test_cpu_op_schema_and_fake_kernels():
    from torch.library import opcheck
    x = torch.randn(7, 5, dtype=torch.float64)
    y, norm = torch.ops.metrix_ops.unit_rows_fwd(x)
    assert norm.shape == (7, 1)
    opcheck(torch.ops.metrix_ops.unit_rows_fwd.default, (x,))
    opcheck(torch.ops.metrix_ops.unit_rows_bwd.default, (torch.randn(7, 5, dtype=torch.float64), y, norm))


@needs_op
def test_cpu_op_refuses_what_it_does_not_take():
    """Called directly (the Python side never does this), a half tensor, a 1-D tensor or a
    gradient of another shape is an error naming the argument, not a crash."""
    fwd, bwd = torch.ops.metrix_ops.unit_rows_fwd, torch.ops.metrix_ops.unit_rows_bwd
    with pytest.raises(RuntimeError, match="x must be float32 or float64"):
        fwd(torch.randn(3, 4, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="x must be 2-D"):
        fwd(torch.randn(4))
    y, norm = fwd(torch.randn(3, 4))
    with pytest.raises(RuntimeError, match="grad must have y's shape and dtype"):
        bwd(torch.randn(3, 5), y, norm)
    with pytest.raises(RuntimeError, match="norm must hold one value per row"):
        bwd(torch.randn(3, 4), y, norm[:2])
    assert not unit_rows_mod.cpu_op(torch.randn(3, 4, dtype=torch.float16))
