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
