"""Checks of HPHNTripletLoss with Embedding Expansion shared by the GPU engines' test files
(test_triton_ee_hphn.py, test_cuda_ee_hphn.py): each takes the engine's backend name and a
function moving the test tensors to its device; the reference is the oracle."""
import torch

import metrix_ops as mo
from cases import assert_close_vg
from test_fused_hphn_cpu import batch


def engine_losses(backend, n, pairs="all", **kw):
    """The engine's loss and the reference's, with the same EE settings."""
    ee = mo.Expansion(n_points=n, pairs=pairs)
    return [mo.losses.HPHNTripletLoss(backend=be, expansion=ee, **kw)
            for be in (backend, "reference")]


def degenerate_batch(n):
    """Low dimension (large cosines, near-ties), a coincident segment whose points tie with
    its ends, an antipodal one, a nearly coincident one, a duplicate negative."""
    x, y = batch(48, 4, 16, seed=n)
    y[:12] = torch.arange(12) % 3
    x[3] = x[0]
    x[4] = -x[1]
    x[6] = x[0] + 1e-9 * x[2]
    x[13], y[13] = x[5], (y[5] + 1) % 12
    return x, y


def check_edge_labels(backend, dev, labels):
    y = torch.tensor(labels)
    x, _ = batch(len(labels), 5, 1, seed=4)
    x, y = dev(x, y)
    fused, ref = engine_losses(backend, 2)
    v = assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x)
    if len(set(labels)) in (1, len(labels)):
        assert v == 0


def check_duplicate_embeddings(backend, dev):
    x, y = batch(12, 6, 3, seed=5)
    x[1], y[1] = x[0], y[0]  # a duplicate positive
    x[5], y[5] = x[3], (y[3] + 1) % 3  # a duplicate negative: distance 0
    x[7] = x[9]
    x, y = dev(x, y)
    for n in (0, 1, 8):
        fused, ref = engine_losses(backend, n, margin=0.3)
        assert torch.isfinite(assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x))


def check_float32_and_half(backend, dev):
    x, y = batch(40, 16, 6, seed=2)
    x, y = dev(x, y)
    fused, ref = engine_losses(backend, 2)
    assert_close_vg(lambda e: fused(e.float(), y).double(),
                    lambda e: ref(e, y), x, rtol=1e-4, atol=1e-6)
    h = x.detach().half().requires_grad_()
    v = fused(h, y)
    v.backward()
    assert v.dtype == torch.float32 and torch.isfinite(h.grad).all()
    torch.testing.assert_close(v, ref(h.detach().float(), y), rtol=1e-4, atol=1e-5)
