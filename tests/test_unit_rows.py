"""The fused engines' row normalisation (ops/unit_rows.py) against F.normalize, value and
gradient, over odd shapes, zero and tiny rows (F.normalize's eps clamp), huge rows, fp64,
fp32, bf16, gradcheck and torch.compile; and the one-pass finiteness check of the inputs."""
import pytest
import torch
import torch.nn.functional as F

from metrix_ops.distances import CosineSimilarity, LpDistance
from metrix_ops.ops.unit_rows import normalized, unit_rows
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
