import pytest
import torch
import torch.nn.functional as F

import metrix_ops  # noqa: F401
from metrix_ops import _ext

pytestmark = pytest.mark.skipif(not _ext.HAS_EXT, reason="extension not built")
if _ext.HAS_EXT:
    from metrix_ops.ops import sim_row_stats

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def reference(x, r, scale):
    s = scale * F.normalize(x.double(), dim=1) @ F.normalize(r.double(), dim=1).t()
    return s.max(1).values, s.argmax(1), torch.logsumexp(s, 1), s


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("b,m,d,chunk", [(1, 1, 3, 1), (7, 5, 17, 2), (33, 130, 64, 31), (5, 9, 3, 100)])
def test_matches_dense_reference(dtype, b, m, d, chunk, device="cpu"):
    g = torch.Generator().manual_seed(b * 1000 + m)
    x = torch.randn(b, d, generator=g).to(device, dtype)
    r = torch.randn(m, d, generator=g).to(device, dtype)
    mx, arg, lse = sim_row_stats(x, r, scale=3.0, chunk=chunk)
    emx, earg, else_, s = reference(x, r, 3.0)
    tol = TOL[dtype] * 10
    assert mx.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(mx.double().cpu(), emx.cpu(), rtol=tol, atol=tol)
    torch.testing.assert_close(lse.double().cpu(), else_.cpu(), rtol=tol, atol=tol)
    # argmax may differ from the dense one only between values equal up to rounding
    picked = s.cpu().gather(1, arg.cpu()[:, None])[:, 0]
    torch.testing.assert_close(picked, emx.cpu(), rtol=tol, atol=tol)
    if dtype == torch.float64:
        assert torch.equal(arg.cpu(), earg.cpu())


def test_ties_go_to_lowest_index():
    r = torch.randn(6, 4, dtype=torch.float64)
    r[4] = r[1]
    r[5] = 2.0 * r[1]  # same direction: same cosine
    x = r[1:2].clone()
    for chunk in (1, 2, 4, 6):
        _, arg, _ = sim_row_stats(x, r, chunk=chunk)
        assert int(arg[0]) == 1


def test_empty_sides():
    x = torch.randn(3, 4)
    mx, arg, lse = sim_row_stats(x, x[:0])
    assert torch.isneginf(mx).all() and (arg == -1).all() and torch.isneginf(lse).all()


def test_gradcheck_lse():
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    r = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: sim_row_stats(a, b, 2.5, 3)[2], (x, r))


def test_grad_matches_dense_autograd():
    x = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    r = torch.randn(13, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, dtype=torch.float64)
    gx, gr = torch.autograd.grad((sim_row_stats(x, r, 4.0, 5)[2] * w).sum(), (x, r))
    ex, er = torch.autograd.grad((reference(x, r, 4.0)[2] * w).sum(), (x, r))
    torch.testing.assert_close(gx, ex)
    torch.testing.assert_close(gr, er)


def test_opcheck():
    x = torch.randn(6, 5, requires_grad=True)
    r = torch.randn(8, 5, requires_grad=True)
    torch.library.opcheck(torch.ops.metrix_ops.sim_row_stats.default, (x, r, 2.0, 3))


def test_torch_compile_fullgraph_matches_eager():
    x, r = torch.randn(10, 8), torch.randn(12, 8)

    def f(a, b):
        return torch.ops.metrix_ops.sim_row_stats(a, b, 1.5, 4)[2].sum() * 2

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, r), f(x, r))


def test_bad_input():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="r has dim 5"):
        sim_row_stats(x, torch.randn(2, 5))
    with pytest.raises(ValueError, match="x must be 2-D"):
        sim_row_stats(x[0])
    with pytest.raises(TypeError, match="r has dtype"):
        sim_row_stats(x, torch.randn(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="chunk must be"):
        sim_row_stats(x, chunk=0)
    with pytest.raises(ValueError, match="x contains NaN"):
        sim_row_stats(torch.full((2, 3), float("nan")))
    with pytest.raises(RuntimeError, match="x and r must have the same D"):
        torch.ops.metrix_ops.sim_row_stats(x, torch.randn(2, 5), 1.0, 2)


cuda = pytest.mark.skipif(not (torch.cuda.is_available() and _ext.HAS_CUDA_EXT), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("b,m,d,chunk", [(1, 1, 3, 1), (7, 5, 17, 2), (33, 1030, 64, 257), (300, 9, 3, 100)])
def test_cuda_matches_dense_reference(dtype, b, m, d, chunk):
    torch.backends.cuda.matmul.allow_tf32 = False
    test_matches_dense_reference(dtype, b, m, d, chunk, device="cuda")


@cuda
def test_cuda_grad_and_ties():
    r = torch.randn(600, 4, dtype=torch.float64, device="cuda")
    r[500] = r[3]
    _, arg, _ = sim_row_stats(r[3:4].clone(), r, chunk=256)
    assert int(arg[0]) == 3
    x = torch.randn(5, 3, dtype=torch.float64, device="cuda", requires_grad=True)
    rr = torch.randn(7, 3, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: sim_row_stats(a, b, 2.5, 3)[2], (x, rr))
