"""The fused ops compute the cosine of L2-normalised rows: a distance that only looks like it
(PML's CosineSimilarity(p=1) normalises by the L1 norm) must not take the fused path with
the wrong similarity: "auto" gives PML's value through the reference."""
import pytest
import torch
from pytorch_metric_learning import distances as pd
from pytorch_metric_learning import losses as pl

import metrix_ops as mo
from cases import assert_close_vg

LOSSES = ["MultiSimilarityLoss", "ContrastiveLoss", "TripletMarginLoss",
          "GeneralizedLiftedStructureLoss", "LiftedStructureLoss"]


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("p", [1, 3])
def test_cosine_with_another_norm_equals_pml(name, p):
    g = torch.Generator().manual_seed(p)
    x = torch.randn(19, 6, dtype=torch.float64, generator=g)
    y = torch.randint(0, 4, (19,), generator=g)
    ours = getattr(mo.losses, name)(distance=pd.CosineSimilarity(p=p), backend="auto")
    theirs = getattr(pl, name)(distance=pd.CosineSimilarity(p=p))
    assert_close_vg(lambda e: ours(e, y), lambda e: theirs(e, y), x)


def test_is_cosine_requires_the_l2_norm():
    assert mo.distances.is_cosine(mo.distances.CosineSimilarity())
    assert not mo.distances.is_cosine(mo.distances.CosineSimilarity(p=1))


@pytest.mark.parametrize("name", ["MultiSimilarityLoss", "ContrastiveLoss", "ProxyAnchorLoss",
                                  "ProxyNCALoss", "NTXentLoss", "LiftedStructureLoss"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_labels_of_any_integer_dtype(name, dtype):
    """Labels of another integer dtype give what int64 labels give, on every backend path
    (the fused ops take int64; the reference's one_hot needs int64 too)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(17, 5, dtype=torch.float64, generator=g)
    y = torch.randint(0, 4, (17,), generator=g)
    args = (4, 5) if name.startswith("Proxy") else ()
    for backend in ("auto", "reference"):
        torch.manual_seed(0)
        a = getattr(mo.losses, name)(*args, backend=backend)
        torch.manual_seed(0)
        b = getattr(mo.losses, name)(*args, backend=backend)
        assert_close_vg(lambda e: a(e, y.to(dtype)), lambda e: b(e, y), x)


def test_cross_batch_memory_with_int32_labels():
    """CrossBatchMemory's streaming path widens the batch's labels as the driver does."""
    def run(dtype):
        torch.manual_seed(0)
        m = mo.losses.CrossBatchMemory(mo.losses.MultiSimilarityLoss(), 5, memory_size=20)
        g = torch.Generator().manual_seed(1)
        outs = []
        for _ in range(3):
            x = torch.randn(8, 5, dtype=torch.float64, generator=g).requires_grad_(True)
            y = torch.randint(0, 3, (8,), generator=g)
            out = m(x, y.to(dtype))
            outs.append((out.detach(), torch.autograd.grad(out, x)[0]))
        return outs

    for a, b in zip(run(torch.int32), run(torch.int64)):
        torch.testing.assert_close(a, b)
