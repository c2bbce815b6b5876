"""The fused losses under PyTorch's other autograd features, which PML's plain-PyTorch losses
all have: a graph kept for a second backward (retain_graph), activation checkpointing (the
forward run again inside the backward), anomaly mode with its NaN check, and no-grad and
inference mode (the bare ops). Each must give the plain backward's gradient, bit for bit,
or the plain forward's value."""
import warnings

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import metrix_ops as mo
from metrix_ops import _ext

pytestmark = pytest.mark.skipif(not _ext.HAS_EXT, reason="needs the compiled extension")

CASES = [
    ("MultiSimilarityLoss", {}),
    ("ContrastiveLoss", {}),
    ("TripletMarginLoss", {}),
    ("ProxyAnchorLoss", {"num_classes": 5, "embedding_size": 9}),
    ("NTXentLoss", {}),
    ("MultiSimilarityLoss", {"metrix": mo.Metrix(lam=0.3)}),
    ("HPHNTripletLoss", {"expansion": mo.Expansion(n_points=3)}),
]
IDS = [f"{n}-{i}" for i, (n, _) in enumerate(CASES)]


@pytest.fixture(params=CASES, ids=IDS)
def setup(request):
    name, kw = request.param
    torch.manual_seed(0)
    loss = getattr(mo.losses, name)(backend="cpu", **kw).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(17, 9, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (17,), generator=g)
    leaf = x.clone().requires_grad_()
    value = loss(leaf, y)
    (grad,) = torch.autograd.grad(value, leaf)
    return loss, x, y, value.detach(), grad


def exact(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_retain_graph_twice(setup):
    loss, x, y, _, grad = setup
    leaf = x.clone().requires_grad_()
    value = loss(leaf, y)
    exact(torch.autograd.grad(value, leaf, retain_graph=True)[0], grad)
    exact(torch.autograd.grad(value, leaf)[0], grad)


def test_activation_checkpointing(setup):
    loss, x, y, value, grad = setup
    for reentrant in (False, True):
        leaf = x.clone().requires_grad_()
        out = checkpoint(lambda t: loss(t * 1.0, y), leaf, use_reentrant=reentrant)
        out.backward()
        exact(out.detach(), value)
        exact(leaf.grad, grad)


def test_anomaly_mode(setup):
    loss, x, y, _, grad = setup
    leaf = x.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anomaly mode's own "slow" warning
        with torch.autograd.detect_anomaly(check_nan=True):
            exact(torch.autograd.grad(loss(leaf, y), leaf)[0], grad)


def test_no_grad_and_inference_mode(setup):
    loss, x, y, value, _ = setup
    leaf = x.clone().requires_grad_()
    with torch.no_grad():
        out = loss(leaf, y)
    assert out.grad_fn is None
    exact(out, value)
    with torch.inference_mode():
        out = loss(x, y)
    exact(out, value)
