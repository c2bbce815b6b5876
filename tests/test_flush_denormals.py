"""The CPU kernels' tasks run with denormals flushed (csrc/cpu/flush_denormals.h), and must
leave the caller's floating-point mode as it was: after a Metrix loss, on one thread (the
tasks then run on the calling thread itself) and on two, a denormal product is still
denormal in PyTorch, and the loss equals the reference."""
import pytest
import torch

import metrix_ops as mo
from metrix_ops import _ext

pytestmark = pytest.mark.skipif(not _ext.HAS_EXT, reason="extension not built")


def denormal_survives() -> bool:
    tiny = torch.tensor([1e-38], dtype=torch.float32) * torch.tensor([1e-2])
    return 0 < tiny.item() < torch.finfo(torch.float32).tiny


@pytest.mark.parametrize("threads", [1, 2])
def test_mode_restored_after_a_metrix_loss(threads):
    assert denormal_survives()
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(3)
        x = torch.randn(48, 16, generator=g)
        y = torch.randint(0, 6, (48,), generator=g)
        metrix = mo.Metrix(lam=0.3)
        cpu = mo.losses.CircleLoss(backend="cpu", metrix=metrix)(x, y)
        ref = mo.losses.CircleLoss(backend="reference", metrix=metrix)(x, y)
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(cpu, ref, rtol=1e-4, atol=1e-5)
    assert denormal_survives()
