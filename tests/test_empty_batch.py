"""An empty batch or an empty reference set is not an error: PML returns a zero loss still
attached to the inputs (zero gradients), and so does every loss here, on every CPU path
(reference and fused, with Metrix, EE or a miner as options); ProxyNCA, where PML's
softmax over no rows gives NaN, gives 0 too. Malformed input is still refused first."""
import inspect

import pytest
import torch
from pytorch_metric_learning import losses as pl

import metrix_ops as mo
from metrix_ops.losses.base import BaseMetricLoss

D = 5
LOSSES = sorted(n for n, c in vars(mo.losses).items()
                if inspect.isclass(c) and issubclass(c, BaseMetricLoss) and c.loss_name)
OPTIONS = {"plain": {}, "metrix": {"metrix": mo.Metrix(lam=0.3)},
           "expansion": {"expansion": mo.Expansion(n_points=2)},
           "miner": {"miner": mo.miners.TripletMarginMiner(0.2)}}


def make(name, backend, **kw):
    cls = getattr(mo.losses, name)
    if "num_classes" in inspect.signature(cls.__init__).parameters:
        kw.update(num_classes=3, embedding_size=D)
    return cls(backend=backend, **kw)


def refusal(name, backend, options):
    """The error of an option combination the loss does not take (on a non-empty batch), or
    None."""
    x, y = torch.randn(6, D, dtype=torch.float64), torch.tensor([0, 0, 1, 1, 2, 2])
    try:
        make(name, backend, **options)(x, y)
    except (NotImplementedError, ValueError) as e:
        return e
    return None


def zero_with_zero_grads(loss, x, **call):
    leaves = [x] + [v for v in call.values() if torch.is_tensor(v) and v.is_floating_point()]
    leaves += list(loss.parameters())
    v = loss(x, torch.zeros(len(x), dtype=torch.long), **call)
    assert v.ndim == 0 and v.item() == 0.0
    assert v.dtype == (torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype)
    grads = torch.autograd.grad(v, leaves)
    for g, t in zip(grads, leaves):
        assert g.shape == t.shape and not g.any()


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("name", LOSSES)
def test_empty_batch_is_a_zero_loss(name, backend, option):
    loss = make(name, backend, **OPTIONS[option])
    refused = refusal(name, backend, OPTIONS[option])
    if refused is not None:  # refused on an empty batch too (the fused engines' "does not
        # cover" comes before the option's own error on a full batch: the same type)
        with pytest.raises(type(refused)):
            loss(torch.zeros(0, D, dtype=torch.float64), torch.zeros(0, dtype=torch.long))
        return
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        zero_with_zero_grads(loss, torch.zeros(0, D, dtype=dtype, requires_grad=True))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("name", LOSSES)
def test_empty_references_are_a_zero_loss(name, backend):
    if "ref_emb" not in inspect.signature(mo.losses.ContrastiveLoss.forward).parameters:
        pytest.skip("no ref_emb")
    loss = make(name, backend)
    x = torch.randn(4, D, dtype=torch.float64, requires_grad=True)
    refs = {"ref_emb": torch.zeros(0, D, dtype=torch.float64, requires_grad=True),
            "ref_labels": torch.zeros(0, dtype=torch.long)}
    try:
        loss(torch.randn(4, D, dtype=torch.float64), torch.zeros(4, dtype=torch.long),
             ref_emb=torch.randn(3, D, dtype=torch.float64), ref_labels=torch.zeros(3, dtype=torch.long))
    except ValueError as e:  # the losses that take no references refuse them, empty or not
        assert "does not take ref_emb" in str(e)
        with pytest.raises(ValueError, match="does not take ref_emb"):
            loss(x, torch.zeros(4, dtype=torch.long), **refs)
        return
    zero_with_zero_grads(loss, x, **refs)


PML_LOSSES = [n for n in LOSSES if hasattr(pl, n) and n != "ProxyNCALoss"]


@pytest.mark.parametrize("name", PML_LOSSES)
def test_empty_batch_equals_pml(name):
    """PML's own value and gradient on the same empty batch (ProxyNCA aside: NaN there)."""
    kw = {"num_classes": 3, "embedding_size": D} if name.startswith("Proxy") else {}
    ours, theirs = make(name, "auto"), getattr(pl, name)(**kw)
    x = torch.zeros(0, D, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long)
    a, b = ours(x, y), theirs(x, y)
    torch.testing.assert_close(a, b)
    (ga,), (gb,) = torch.autograd.grad(a, x), torch.autograd.grad(b, x)
    torch.testing.assert_close(ga, gb)


def test_malformed_empty_input_is_still_refused():
    loss = mo.losses.MultiSimilarityLoss(backend="cpu")
    with pytest.raises(ValueError, match="labels has 1 entries but there are 0"):
        loss(torch.zeros(0, D), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="embeddings has embedding_dim 0"):
        loss(torch.zeros(0, 0), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="ref_emb has embedding_dim"):
        loss(torch.zeros(2, D), torch.zeros(2, dtype=torch.long), ref_emb=torch.zeros(0, D + 1),
             ref_labels=torch.zeros(0, dtype=torch.long))
    # the backend is checked first: its error (no CUDA kernels here, or CPU tensors), never 0
    with pytest.raises((ValueError, RuntimeError), match="backend='cuda' needs"):
        mo.losses.MultiSimilarityLoss(backend="cuda")(torch.zeros(0, D), torch.zeros(0, dtype=torch.long))


def test_cross_batch_memory_with_an_empty_batch():
    """Every row enqueued only (enqueue_mask all true) or no row at all: a zero loss, as PML's
    wrapper gives for the former."""
    torch.manual_seed(0)
    m = mo.losses.CrossBatchMemory(mo.losses.MultiSimilarityLoss(metrix=mo.Metrix(lam=0.3)), D,
                                   memory_size=12)
    x = torch.randn(4, D, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1])
    assert m(x, y).item() != 0
    v = m(x, y, enqueue_mask=torch.ones(4, dtype=torch.bool))
    assert v.item() == 0.0 and not torch.autograd.grad(v, x)[0].any()
    e = torch.zeros(0, D, requires_grad=True)
    assert m(e, torch.zeros(0, dtype=torch.long)).item() == 0.0
