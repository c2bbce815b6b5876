"""The Triton row normalisation (triton/unit_rows.py: one kernel forward, one backward, used
for CUDA tensors) against the PyTorch form it replaces there (ops/unit_rows.py) and against
F.normalize: values, norms and gradients over odd shapes (B = 1, D = 1, several feature
blocks), zero rows and rows under F.normalize's eps, strided inputs; the autograd path with
the kernels forced on; gradcheck and opcheck of the custom ops; the kernels (and ProxyAnchor's
state merge, a kernel of the same kind) compile for sm_90."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import metrix_ops.triton as mt
from metrix_ops.ops import unit_rows as ur
from triton_cases import DEVICE, compiles_only, requires_triton, run_sm90_script

pytestmark = requires_triton

if mt.usable_on(DEVICE):
    from metrix_ops.triton.unit_rows import unit_rows_bwd, unit_rows_fwd

TOL = {torch.float64: dict(rtol=1e-13, atol=1e-15), torch.float32: dict(rtol=2e-6, atol=1e-7)}
SHAPES = [(1, 1), (1, 7), (5, 3), (17, 300), (33, 1024)]


def _rows(b, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    if b >= 5:
        x[1] = 0  # normalises to 0
        x[3] *= 1e-14  # under F.normalize's eps: divided by eps, no gradient to its norm
    return x.to(dtype).to(DEVICE), torch.randn(b, d, generator=g, dtype=dtype).to(DEVICE)


@pytest.mark.parametrize("b,d", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kernels_match_the_torch_form(b, d, dtype):
    x, g = _rows(b, d, dtype, seed=b * 31 + d)
    y, norm = unit_rows_fwd(x)
    xr = x.clone().requires_grad_()
    yr, nr = ur._UnitRows.apply(xr)
    (yr * g).sum().backward()
    # the values scale with 1/eps on the short row: compare row by row, relative to its size
    scale = lambda t: t.abs().amax(1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    torch.testing.assert_close(y / scale(yr), yr / scale(yr), **TOL[dtype])
    torch.testing.assert_close(norm, nr, **TOL[dtype])
    dx = unit_rows_bwd(g, y, norm)
    torch.testing.assert_close(dx / scale(xr.grad), xr.grad / scale(xr.grad), **TOL[dtype])
    if b >= 5:
        assert not y[1].any()
        torch.testing.assert_close(dx[1], g[1] / 1e-12, **TOL[dtype])  # zero row: g / eps


def test_strided_inputs():
    """A view into a wider tensor (row stride > D) is read in place; a column-strided one
    (a transpose) is made contiguous first; the results are those of the contiguous rows."""
    wide, _ = _rows(9, 40, torch.float64, seed=3)
    x = wide[:, 5:29]
    y, norm = unit_rows_fwd(x)
    yc, nc = unit_rows_fwd(x.contiguous())
    assert torch.equal(y, yc) and torch.equal(norm, nc)
    t = x.contiguous().t().contiguous().t()
    assert t.stride(1) != 1
    assert torch.equal(unit_rows_fwd(t)[0], yc)
    g = torch.randn(24, 9, dtype=torch.float64).to(DEVICE).t()  # a column-strided gradient
    torch.testing.assert_close(unit_rows_bwd(g, y, norm), unit_rows_bwd(g.contiguous(), y, norm),
                               rtol=0, atol=0)


def test_autograd_path_with_the_kernels(monkeypatch):
    """unit_rows with the kernels forced on (as on CUDA tensors) gives F.normalize's value and
    gradient, gradcheck passes, and the kernels are what ran."""
    x, g = _rows(11, 13, torch.float64, seed=5)
    x[3] = x[4]  # away from eps: F.normalize's gradient is what unit_rows reproduces
    calls = []
    import metrix_ops.triton.unit_rows as tur
    for name in ("unit_rows_fwd", "unit_rows_bwd"):
        orig = getattr(tur, name)
        monkeypatch.setattr(tur, name, lambda *a, _o=orig, _n=name: calls.append(_n) or _o(*a))
    monkeypatch.setattr(ur, "one_kernel", lambda t: True)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    (ur.unit_rows(a) * g).sum().backward()
    (F.normalize(b, dim=1) * g).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, **TOL[torch.float64])
    assert calls == ["unit_rows_fwd", "unit_rows_bwd"]
    assert torch.autograd.gradcheck(lambda t: ur.unit_rows(t), (x[5:, :5].clone().requires_grad_(),))


def test_empty_batch_and_opcheck():
    y, norm = unit_rows_fwd(torch.zeros(0, 4, dtype=torch.float64, device=DEVICE))
    assert y.shape == (0, 4) and norm.shape == (0, 1)
    x, g = _rows(6, 5, torch.float32, seed=9)
    torch.library.opcheck(torch.ops.metrix_ops.triton_unit_rows_fwd.default, (x,))
    y, norm = unit_rows_fwd(x)
    torch.library.opcheck(torch.ops.metrix_ops.triton_unit_rows_bwd.default, (g, y, norm))


_SM90 = r'''
import metrix_ops.triton.proxy_anchor as pa
import metrix_ops.triton.unit_rows as ur

failed = []
for fdt, acc in [("fp32", tl.float32), ("fp64", tl.float64)]:
    block_r, block_d = ur._blocks(512)
    for fn, consts in [(ur._unit_rows_fwd_kernel, dict(BLOCK_R=block_r, BLOCK_D=block_d, ACC=acc)),
                       (ur._unit_rows_bwd_kernel, dict(BLOCK_R=block_r, BLOCK_D=block_d, ACC=acc)),
                       (pa._merge_lse_one_kernel, dict(BLOCK_C=1024, ACC=acc))]:
        try:  # (compile_sm90 takes a y_ptr for labels by default)
            compile_sm90(fn, consts, fdt, pointer_types={"y_ptr": "*" + fdt})
        except Exception as e:  # noqa: BLE001
            failed.append(f"{fn.__name__} {fdt}: {type(e).__name__}: {str(e)[:300]}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
'''


@compiles_only
def test_kernels_compile_for_h100():
    run_sm90_script(_SM90)
