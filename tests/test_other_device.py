"""A loss on tensors of a CUDA device other than the current one: the fused ops run on the
tensors' device (driver.op_scope makes it current, as the C++ ops' device guard does; Triton
launches on the current device) and leave the current device as it was. The values against
the reference on the CPU; the check needs two GPUs. op_scope's autocast half runs here."""
import pytest
import torch

import metrix_ops as mo
from metrix_ops import _ext
from metrix_ops.driver import op_scope

two_gpus = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                              reason="needs two CUDA devices")

CASES = {
    "ms": lambda b: mo.losses.MultiSimilarityLoss(backend=b),
    "contrastive": lambda b: mo.losses.ContrastiveLoss(backend=b),
    "triplet": lambda b: mo.losses.TripletMarginLoss(backend=b),
    "proxy-anchor": lambda b: mo.losses.ProxyAnchorLoss(5, 24, backend=b),
    "ms-metrix": lambda b: mo.losses.MultiSimilarityLoss(backend=b, metrix=mo.Metrix(lam=0.3)),
    "ms-ee": lambda b: mo.losses.MultiSimilarityLoss(backend=b, expansion=mo.Expansion(n_points=2)),
}


def test_op_scope_turns_autocast_off_on_cpu():
    x = torch.randn(3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with op_scope(x):
            assert not torch.is_autocast_enabled("cpu")
            assert (x @ x.T).dtype == torch.float32
        assert torch.is_autocast_enabled("cpu")


@two_gpus
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_on_the_second_gpu_while_the_first_is_current(case, backend):
    if backend == "cuda" and not _ext.HAS_CUDA_EXT:
        pytest.skip("the CUDA kernels are not built")
    g = torch.Generator().manual_seed(7)
    x = torch.randn(37, 24, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (37,), generator=g)
    ref = CASES[case]("reference").double()
    ours = CASES[case](backend)
    ours.load_state_dict(ref.state_dict())  # the same proxies, as fp32
    xr = x.clone().requires_grad_()
    want = ref(xr, y)
    want.backward()
    ours = ours.to("cuda:1")
    x1 = x.to("cuda:1").float().requires_grad_()
    with torch.cuda.device(0):
        got = ours(x1, y.to("cuda:1"))
        got.backward()
        torch.cuda.synchronize(1)
        assert torch.cuda.current_device() == 0
    assert got.device == torch.device("cuda:1") and x1.grad.device == torch.device("cuda:1")
    torch.testing.assert_close(got.double().cpu(), want.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x1.grad.double().cpu(), xr.grad, rtol=1e-3, atol=1e-5)
