"""metrix_ops::sim_row_stats (csrc/cpu, csrc/cuda, metrix_ops/ops/row_stats.py) against a dense
float64 torch reference."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import metrix_ops  # noqa: F401
from metrix_ops import _ext

pytestmark = pytest.mark.skipif(not _ext.HAS_EXT, reason="extension not built")
if _ext.HAS_EXT:
    from metrix_ops.ops import sim_row_stats

# Absolute/relative tolerance on max and lse at scale 3 (|S| ≤ 3). Half inputs lose about
# 2^-11 (fp16) / 2^-8 (bf16) relative on each input and, on CUDA, on S itself.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}
DTYPES = list(TOL)
# odd shapes; chunk < M wherever M > 1, so several chunks (and a ragged last one) merge
SHAPES = [(b, m, d, max(1, m // 3)) for b, m, d in itertools.product((1, 7, 33), (1, 5, 130), (3, 17, 64))]
SCALE = 3.0


def reference(x, r, scale):
    s = scale * F.normalize(x.double(), dim=1) @ F.normalize(r.double(), dim=1).t()
    return s.max(1).values, s.argmax(1), torch.logsumexp(s, 1), s


def check_against_reference(x, r, chunk, scale=SCALE):
    dtype = x.dtype
    mx, arg, lse = sim_row_stats(x, r, scale=scale, chunk=chunk)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert mx.dtype == acc and lse.dtype == acc and arg.dtype == torch.int64
    assert mx.shape == arg.shape == lse.shape == (x.shape[0],)
    assert mx.device == x.device
    emx, earg, else_, s = reference(x, r, scale)
    tol = TOL[dtype]
    torch.testing.assert_close(mx.double().cpu(), emx.cpu(), rtol=tol, atol=tol)
    torch.testing.assert_close(lse.double().cpu(), else_.cpu(), rtol=tol, atol=tol)
    # After rounding, the argmax may differ from the dense one only between values that are
    # equal up to that rounding.
    picked = s.cpu().gather(1, arg.cpu()[:, None])[:, 0]
    torch.testing.assert_close(picked, emx.cpu(), rtol=tol, atol=tol)
    if dtype == torch.float64:
        assert torch.equal(arg.cpu(), earg.cpu())
    return mx, arg, lse


def random_inputs(b, m, d, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed * 7919 + b * 1000 + m * 10 + d)
    x = torch.randn(b, d, generator=g, dtype=torch.float64).to(device, dtype)
    r = torch.randn(m, d, generator=g, dtype=torch.float64).to(device, dtype)
    return x, r


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,m,d,chunk", SHAPES)
def test_matches_dense_reference(dtype, b, m, d, chunk):
    x, r = random_inputs(b, m, d, dtype)
    check_against_reference(x, r, chunk)


@pytest.mark.parametrize("chunk", [1, 4, 130, 1000])
def test_result_does_not_depend_on_chunk(chunk):
    x, r = random_inputs(9, 130, 17, torch.float64)
    base = sim_row_stats(x, r, 5.0, 7)
    out = sim_row_stats(x, r, 5.0, chunk)
    torch.testing.assert_close(out[0], base[0], rtol=0, atol=1e-12)
    assert torch.equal(out[1], base[1])
    torch.testing.assert_close(out[2], base[2], rtol=1e-13, atol=1e-12)


def test_r_none_is_self_and_scale_kinds():
    x, _ = random_inputs(11, 1, 8, torch.float64)
    mx, arg, lse = sim_row_stats(x, scale=-2)  # int and negative scales are fine
    emx, earg, else_, _ = reference(x, x, -2.0)
    torch.testing.assert_close(mx, emx)
    assert torch.equal(arg, earg)
    torch.testing.assert_close(lse, else_)
    _, arg, _ = sim_row_stats(x)  # each row's best match in itself is itself
    assert torch.equal(arg, torch.arange(11))


def test_non_contiguous_inputs():
    x, r = random_inputs(6, 20, 10, torch.float64)
    xt = x.t().contiguous().t()
    rs = torch.cat([r, r], 1)[:, ::2]
    assert not xt.is_contiguous() and not rs.is_contiguous()
    check_against_reference(xt, rs, 3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ties_go_to_lowest_index(dtype):
    g = torch.Generator().manual_seed(1)
    r = torch.randn(40, 4, generator=g, dtype=torch.float64)
    r[17] = r[3]
    r[33] = 2.0 * r[3]  # same direction, same cosine
    r[25] = r[3]
    r[35] = r[3]  # the same CUDA lane / CPU lane as index 3 (32 apart)
    x = r[[3]].clone()
    r, x = r.to(dtype), x.to(dtype)
    for chunk in (1, 2, 3, 5, 16, 40, 64):
        _, arg, _ = sim_row_stats(x, r, chunk=chunk)
        assert int(arg[0]) == 3, chunk
    # all-equal row: every column ties
    _, arg, _ = sim_row_stats(torch.ones(2, 3, dtype=dtype), torch.ones(9, 3, dtype=dtype), chunk=4)
    assert arg.tolist() == [0, 0]
    # zero vectors normalise to 0 (eps clamp, as F.normalize): S is all 0, argmax 0
    mx, arg, lse = sim_row_stats(torch.zeros(1, 3, dtype=dtype), torch.randn(5, 3).to(dtype), chunk=2)
    assert float(mx[0]) == 0.0 and int(arg[0]) == 0
    torch.testing.assert_close(lse, torch.log(torch.tensor([5.0], dtype=lse.dtype)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_sides(dtype):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(3, 4).to(dtype)
    mx, arg, lse = sim_row_stats(x, x[:0], chunk=2)  # M = 0
    assert mx.dtype == acc and arg.dtype == torch.int64 and mx.shape == (3,)
    assert torch.isneginf(mx).all() and (arg == -1).all() and torch.isneginf(lse).all()
    for r in (x, x[:0]):  # B = 0, with and without references
        mx, arg, lse = sim_row_stats(x[:0], r, chunk=2)
        assert mx.shape == arg.shape == lse.shape == (0,)
        assert mx.dtype == acc and lse.dtype == acc and arg.dtype == torch.int64


def test_gradcheck_lse():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    r = torch.randn(7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: sim_row_stats(a, b, 2.5, 3)[2], (x, r))
    assert torch.autograd.gradgradcheck(lambda a, b: sim_row_stats(a, b, 2.5, 3)[2], (x, r))
    # r = x: both paths of the gradient reach the same tensor
    assert torch.autograd.gradcheck(lambda a: sim_row_stats(a, None, 1.5, 2)[2], (x,))


def test_grad_matches_dense_autograd():
    x, r = random_inputs(9, 13, 6, torch.float64, seed=3)
    x.requires_grad_()
    r.requires_grad_()
    w = torch.randn(9, dtype=torch.float64)
    gx, gr = torch.autograd.grad((sim_row_stats(x, r, 4.0, 5)[2] * w).sum(), (x, r))
    ex, er = torch.autograd.grad((reference(x, r, 4.0)[2] * w).sum(), (x, r))
    torch.testing.assert_close(gx, ex)
    torch.testing.assert_close(gr, er)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grad_half_and_single(dtype):
    x, r = random_inputs(7, 11, 5, dtype, seed=4)
    x.requires_grad_()
    r.requires_grad_()
    gx, gr = torch.autograd.grad(sim_row_stats(x, r, 2.0, 4)[2].sum(), (x, r))
    assert gx.dtype == dtype and gr.dtype == dtype
    xd, rd = x.detach().double().requires_grad_(), r.detach().double().requires_grad_()
    ex, er = torch.autograd.grad(reference(xd, rd, 2.0)[2].sum(), (xd, rd))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(gx.double(), ex, rtol=tol, atol=tol)
    torch.testing.assert_close(gr.double(), er, rtol=tol, atol=tol)


def test_max_and_argmax_are_not_differentiable():
    x = torch.randn(4, 3, requires_grad=True)
    mx, arg, lse = sim_row_stats(x, torch.randn(5, 3))
    assert lse.requires_grad and not mx.requires_grad and not arg.requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_opcheck(dtype):
    x = torch.randn(6, 5).to(dtype).requires_grad_()
    r = torch.randn(8, 5).to(dtype).requires_grad_()
    torch.library.opcheck(torch.ops.metrix_ops.sim_row_stats.default, (x, r, 2.0, 3))
    torch.library.opcheck(torch.ops.metrix_ops.sim_row_stats.default, (x.detach()[:0], r.detach(), 1.0, 3))


def test_torch_compile_fullgraph_matches_eager():
    x, r = random_inputs(10, 12, 8, torch.float32, seed=5)
    x.requires_grad_()

    def f(a, b):
        mx, arg, lse = sim_row_stats(a, b, 1.5, 4)
        return (lse * 2).sum() + mx.sum() + arg.sum()

    torch._dynamo.reset()
    try:
        compiled = torch.compile(f, fullgraph=True)
        out = compiled(x, r)
    except Exception as e:  # noqa: BLE001
        # Inductor needs a working C++ toolchain; only environment failures may skip.
        msg = str(e)
        if any(k in msg for k in ("CppCompileError", "InvalidCxxCompiler", "No such file", "gcc")):
            pytest.skip(f"torch.compile unavailable here: {msg[:200]}")
        raise
    ref = f(x, r)
    torch.testing.assert_close(out, ref)
    g, = torch.autograd.grad(out, x)
    eg, = torch.autograd.grad(ref, x)
    torch.testing.assert_close(g, eg)


def test_bad_input_messages():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="r has dim 5"):
        sim_row_stats(x, torch.randn(2, 5))
    with pytest.raises(ValueError, match="x must be 2-D"):
        sim_row_stats(x[0])
    with pytest.raises(ValueError, match="r must be 2-D"):
        sim_row_stats(x, torch.randn(2, 3, 1))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        sim_row_stats([[1.0, 2.0]])
    with pytest.raises(TypeError, match="x must be a floating-point"):
        sim_row_stats(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="r must be a floating-point"):
        sim_row_stats(x, torch.ones(2, 3, dtype=torch.int32))
    with pytest.raises(TypeError, match="r has dtype"):
        sim_row_stats(x, torch.randn(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="x has dim 0"):
        sim_row_stats(torch.randn(2, 0))
    with pytest.raises(ValueError, match="x contains NaN"):
        sim_row_stats(torch.full((2, 3), float("nan")))
    with pytest.raises(ValueError, match="r contains NaN or Inf"):
        sim_row_stats(x, torch.tensor([[1.0, float("inf"), 0.0]]))
    with pytest.raises(ValueError, match="chunk must be"):
        sim_row_stats(x, chunk=0)
    with pytest.raises(ValueError, match="chunk must be"):
        sim_row_stats(x, chunk=2.0)
    with pytest.raises(ValueError, match="scale must be finite"):
        sim_row_stats(x, scale=float("inf"))
    with pytest.raises(TypeError, match="scale must be"):
        sim_row_stats(x, scale=torch.tensor(1.0))


def test_bad_input_messages_from_cpp():
    """The raw op (no Python wrapper) checks the same contract and names the argument."""
    op = torch.ops.metrix_ops.sim_row_stats
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="x must be 2-D"):
        op(x[0], x, 1.0, 2)
    with pytest.raises(RuntimeError, match="r must be 2-D"):
        op(x, x[0], 1.0, 2)
    with pytest.raises(RuntimeError, match="x and r must have the same D"):
        op(x, torch.randn(2, 5), 1.0, 2)
    with pytest.raises(RuntimeError, match="x and r must have the same dtype"):
        op(x, x.double(), 1.0, 2)
    with pytest.raises(RuntimeError, match="x must be floating point"):
        op(x.long(), x.long(), 1.0, 2)
    with pytest.raises(RuntimeError, match="chunk must be > 0"):
        op(x, x, 1.0, 0)
    with pytest.raises(RuntimeError, match="scale must be finite"):
        op(x, x, float("nan"), 2)


def test_require_ext_messages(monkeypatch):
    monkeypatch.setattr(_ext, "HAS_CUDA_EXT", False)
    with pytest.raises(RuntimeError, match="CUDA_HOME.*METRIX_OPS_CUDA=1"):
        _ext.require_ext("cuda")
    monkeypatch.setattr(_ext, "HAS_EXT", False)
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation -e ."):
        _ext.require_ext("cpu")


# ---------------------------------------------------------------- CUDA: against the CPU op

cuda = pytest.mark.skipif(not (torch.cuda.is_available() and _ext.HAS_CUDA_EXT),
                          reason="needs a GPU and the CUDA kernels")


# Also a row longer than one warp's stride, more rows than one block, and chunks that are
# not multiples of 32.
CUDA_SHAPES = SHAPES + [(33, 1030, 64, 257), (300, 9, 3, 4), (1, 5000, 16, 5000)]


@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,m,d,chunk", CUDA_SHAPES)
def test_cuda_matches_cpu(dtype, b, m, d, chunk, no_tf32):
    x, r = random_inputs(b, m, d, dtype)
    mx, arg, lse = check_against_reference(x.cuda(), r.cuda(), chunk)
    cmx, carg, clse = sim_row_stats(x, r, SCALE, chunk)
    tol = TOL[dtype]
    torch.testing.assert_close(mx.cpu(), cmx, rtol=tol, atol=tol)
    torch.testing.assert_close(lse.cpu(), clse, rtol=tol, atol=tol)
    if dtype in (torch.float32, torch.float64):
        # equal unless two similarities are within rounding of each other
        s = reference(x, r, SCALE)[3]
        picked, cpicked = s.gather(1, arg.cpu()[:, None]), s.gather(1, carg[:, None])
        torch.testing.assert_close(picked, cpicked, rtol=tol, atol=tol)


@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_ties_and_empty(dtype):
    r = torch.randn(600, 4, dtype=torch.float64)
    r[500] = r[3]
    r[40] = 2.0 * r[3]  # a power of two keeps the normalised row bit-identical
    r = r.to("cuda", dtype)
    for chunk in (7, 256, 600):
        _, arg, _ = sim_row_stats(r[3:4].clone(), r, chunk=chunk)
        assert int(arg[0]) == 3
    x = r[:5]
    mx, arg, lse = sim_row_stats(x, r[:0])
    assert torch.isneginf(mx).all() and (arg == -1).all() and torch.isneginf(lse).all()
    mx, arg, lse = sim_row_stats(r[:0], r)
    assert mx.shape == (0,) and mx.is_cuda


@cuda
def test_cuda_grad_and_opcheck():
    x = torch.randn(5, 3, dtype=torch.float64, device="cuda", requires_grad=True)
    r = torch.randn(7, 3, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: sim_row_stats(a, b, 2.5, 3)[2], (x, r))
    torch.library.opcheck(torch.ops.metrix_ops.sim_row_stats.default, (x, r, 2.0, 3))
    torch.library.opcheck(torch.ops.metrix_ops.sim_row_stats.default,
                          (x.detach().bfloat16(), r.detach().bfloat16(), 2.0, 3))


@cuda
def test_cuda_bad_device():
    x = torch.randn(4, 3, device="cuda")
    with pytest.raises(ValueError, match="r is on cpu but x is on cuda"):
        sim_row_stats(x, torch.randn(2, 3))
    with pytest.raises(RuntimeError, match="x and r must be on the same device"):
        torch.ops.metrix_ops.sim_row_stats(x, torch.randn(2, 3), 1.0, 2)
