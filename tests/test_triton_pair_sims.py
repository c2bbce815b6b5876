"""The Triton kernels of the listed-pair similarities (triton/pair_sims.py: the CUDA kernels of
the extension's pair_sims_fwd / pair_sims_bwd ops) against the C++ CPU op and a dense
product: values, and the gradients' atomic accumulation over pairs listed several times and
rows shared by many pairs; odd widths across feature steps; an empty list. And the
indices_tuple paths they serve, registered for backend="triton" on CUDA tensors (run with
CUDA tensors on a GPU; elsewhere the registration is checked).

Without a GPU the kernels run under TRITON_INTERPRET=1 on CPU tensors."""
import pytest
import torch

import metrix_ops as mo
from cases import assert_close_vg, check_tuple_loss_on_cuda
from metrix_ops import fused
from metrix_ops.ops.pair_sims import HAS_OP
from triton_cases import DEVICE, on_dev, requires_triton

pytestmark = [requires_triton, pytest.mark.skipif(not HAS_OP, reason="no pair_sims op")]


@pytest.mark.parametrize("b,m,d,p", [(7, 9, 3, 40), (20, 33, 37, 300), (5, 6, 130, 65),
                                     (4, 4, 8, 0)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kernels_match_the_cpu_op(b, m, d, p, dtype):
    from metrix_ops.triton.pair_sims import pair_sims_bwd_triton, pair_sims_triton
    g = torch.Generator().manual_seed(b + d + p)
    x = torch.randn(b, d, dtype=dtype, generator=g)
    r = torch.randn(m, d, dtype=dtype, generator=g)
    rows = torch.randint(0, b, (p,), generator=g)  # rows and pairs repeat
    cols = torch.randint(0, m, (p,), generator=g)
    grad = torch.randn(p, dtype=dtype, generator=g)
    ops = torch.ops.metrix_ops
    want = ops.pair_sims_fwd(x, r, rows, cols)
    dx_want, dr_want = ops.pair_sims_bwd(grad, x, r, rows, cols)
    x, r, rows, cols, grad = on_dev(x, r, rows, cols, grad)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pair_sims_triton(x, r, rows, cols).cpu(), want, **tol)
    torch.testing.assert_close((x @ r.t())[rows, cols].cpu(), want, **tol)
    dx, dr = pair_sims_bwd_triton(grad, x, r, rows, cols)
    torch.testing.assert_close(dx.cpu(), dx_want, **tol)
    torch.testing.assert_close(dr.cpu(), dr_want, **tol)


def test_indices_paths_registered_for_cuda_tensors():
    """The pair_sims families' tuple paths are the Triton engine's on CUDA tensors only (on
    CPU tensors the C++ op is the CPU engine's); NPairs and ProxyNCA run theirs on the
    ProxyNCA op, not here."""
    names = {n for (b, n) in fused.INDICES_IMPLS if b == "triton"}
    assert {"MultiSimilarityLoss", "ContrastiveLoss", "TripletMarginLoss", "CircleLoss",
            "NTXentLoss", "LiftedStructureLoss"} <= names
    assert not names & {"NPairsLoss", "ProxyNCALoss"}
    x = torch.randn(9, 4)
    y = torch.randint(0, 3, (9,))
    t = mo.miners.MultiSimilarityMiner(0.3)(x, y)
    loss = mo.losses.ContrastiveLoss(backend="triton")
    if DEVICE.type == "cuda":
        ref = mo.losses.ContrastiveLoss(backend="reference")
        xc, yc = x.double().cuda(), y.cuda()
        tc = tuple(u.cuda() for u in t)
        assert_close_vg(lambda e: loss(e, yc, tc), lambda e: ref(e, yc, tc), xc)
    else:
        with pytest.raises(NotImplementedError, match="does not cover"):
            loss(x, y, t)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="the tuple paths run on CUDA tensors")
@pytest.mark.parametrize("name,miner", [("MultiSimilarityLoss", "ms"), ("CircleLoss", "ms"),
                                        ("ContrastiveLoss", "ms"), ("TripletMarginLoss", "tm"),
                                        ("LiftedStructureLoss", "ms"), ("NTXentLoss", "ms")])
def test_tuple_losses_on_cuda_match_reference(name, miner):
    check_tuple_loss_on_cuda("triton", name, miner)


def test_kernels_check_their_inputs():
    """Called as the ops' CUDA kernels without the Python wrapper, they check as the CPU op."""
    from metrix_ops.triton.pair_sims import pair_sims_bwd_triton, pair_sims_triton
    x, r = on_dev(torch.randn(4, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64))
    rows, cols = on_dev(torch.tensor([0, 1]), torch.tensor([2, 4]))
    with pytest.raises(TypeError, match="float32 or float64"):
        pair_sims_triton(x.half(), r.half(), rows, cols)
    with pytest.raises(ValueError, match="same width"):
        pair_sims_triton(x, r[:, :2], rows, cols)
    with pytest.raises(ValueError, match="1-D int64"):
        pair_sims_triton(x, r, rows.int(), cols)
    with pytest.raises(RuntimeError, match="pair_sims: rows must be in"):
        pair_sims_triton(x, r, rows + 3, cols)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
    with pytest.raises(ValueError, match="one entry per pair"):
        pair_sims_bwd_triton(torch.ones(3, dtype=x.dtype, device=x.device), x, r, rows, cols)


def test_backward_refuses_deterministic_mode():
    from metrix_ops.triton.pair_sims import pair_sims_bwd_triton
    x, r = on_dev(torch.randn(4, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64))
    rows, cols, g = on_dev(torch.tensor([0, 1]), torch.tensor([2, 4]),
                           torch.ones(2, dtype=torch.float64))
    old = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match="does not have a deterministic implementation"):
            pair_sims_bwd_triton(g, x, r, rows, cols)
    finally:
        torch.use_deterministic_algorithms(old)
