"""Reducers given a `keep` mask (what losses give instead of losses[keep], so that a graph
has no data-dependent shape) equal the reducers of the kept terms: value and gradient, for
every reducer, with NaN/Inf in the dropped terms, no term kept, and a device-side divisor."""
import pytest
import torch

from metrix_ops.reducers import (AvgNonZeroReducer, DivisorReducer, MeanReducer, SumReducer,
                                 ThresholdReducer, reduce_loss_dict)

REDUCERS = [MeanReducer(), SumReducer(), AvgNonZeroReducer(), ThresholdReducer(low=0.2),
            ThresholdReducer(high=0.7), ThresholdReducer(low=-0.5, high=0.5)]


def value_grad(fn, losses):
    leaf = losses.detach().clone().requires_grad_(True)
    out = fn(leaf)
    (g,) = torch.autograd.grad(out, leaf, allow_unused=True)
    return out.detach(), torch.zeros_like(leaf) if g is None else g


@pytest.mark.parametrize("reducer", REDUCERS, ids=repr)
@pytest.mark.parametrize("n,frac", [(1, 1.0), (17, 0.6), (40, 0.1), (9, 0.0)])
def test_keep_mask_equals_indexing(reducer, n, frac):
    g = torch.Generator().manual_seed(n)
    losses = torch.randn(n, dtype=torch.float64, generator=g)
    keep = torch.rand(n, generator=g) < frac
    losses[~keep] = torch.tensor([float("nan"), float("inf")], dtype=torch.float64).repeat(n)[:int((~keep).sum())]
    emb = torch.randn(3, 2, dtype=torch.float64)
    va, ga = value_grad(lambda l: reducer.reduce(l, "element", emb, keep=keep), losses)
    vb, gb = value_grad(lambda l: reducer.reduce(l[keep], "element", emb), losses)
    torch.testing.assert_close(va, vb, rtol=1e-12, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-12, equal_nan=True)
    assert torch.isfinite(ga).all()  # the dropped NaN/Inf terms never reach the gradient


@pytest.mark.parametrize("divisor", [0, 3, 5])
def test_divisor_reducer_tensor_divisor(divisor):
    losses = torch.tensor([0.5, 1.5, 2.0, 4.0], dtype=torch.float64)
    emb = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    keep = torch.tensor([True, False, True, True])
    a = DivisorReducer().reduce(losses, "element", emb, divisor=torch.tensor(divisor), keep=keep)
    b = DivisorReducer().reduce(losses[keep], "element", emb, divisor=divisor)
    torch.testing.assert_close(a, b)
    if divisor == 0:
        assert a.item() == 0 and a.requires_grad  # the zero loss, still in the graph


def test_none_kept_zero_rule():
    """A loss dict that marks `none_kept: zero` reduces to the zero loss (in the graph) when
    nothing is kept, as a dict with no terms would, for every reducer (Mean would give NaN)."""
    emb = torch.randn(4, 3, requires_grad=True)
    losses = torch.tensor([1.0, 2.0])
    for red in REDUCERS:
        d = {"loss": {"losses": losses, "indices": None, "reduction_type": "element",
                      "keep": torch.tensor([False, False]), "none_kept": "zero"}}
        out = reduce_loss_dict(d, red, emb)
        assert out.item() == 0 and out.requires_grad
        d["loss"]["keep"] = torch.tensor([True, False])
        torch.testing.assert_close(reduce_loss_dict(d, red, emb),
                                   red.reduce(losses[:1], "element", emb))
