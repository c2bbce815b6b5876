"""Loss modules on their fused CPU path trace whole under torch.compile(fullgraph=True) (input
checks, pair counts, PML's no-pairs rule, the reducer) and match eager in value and
gradient; NaN input still fails, at run time."""
import pytest
import torch

import metrix_ops as mo
from cases import value_and_grad

MODULES = [
    ("MultiSimilarityLoss", {}),
    ("MultiSimilarityLoss", {"metrix": mo.Metrix(lam=0.3)}),  # clean + Metrix in one op
    ("MultiSimilarityLoss", {"miner": mo.miners.MultiSimilarityMiner(0.1)}),  # mined in the op
    ("ContrastiveLoss", {}),
    ("ContrastiveLoss", {"reducer": mo.reducers.MeanReducer()}),
    ("ContrastiveLoss", {"reducer": mo.reducers.SumReducer(), "pos_margin": 0.1}),
    ("ContrastiveLoss", {"metrix": mo.Metrix(lam=0.3)}),  # clean + Metrix in one op
    ("ContrastiveLoss", {"metrix": mo.Metrix(lam=0.6, pairs="anchor_neg"),
                         "distance": mo.distances.CosineSimilarity(),
                         "reducer": mo.reducers.MeanReducer()}),
    ("TripletMarginLoss", {}),
    ("TripletMarginLoss", {"reducer": mo.reducers.MeanReducer(), "margin": 0.3}),
    ("TripletMarginLoss", {"reducer": mo.reducers.SumReducer()}),
]


@pytest.mark.parametrize("name,kw", MODULES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(MODULES)])
def test_module_under_fullgraph_compile_equals_eager(name, kw):
    torch._dynamo.reset()
    loss = getattr(mo.losses, name)(backend="cpu", **kw)
    compiled = torch.compile(lambda e, l: loss(e, l), fullgraph=True, dynamic=False)
    g = torch.Generator().manual_seed(3)
    for b, k in [(13, 4), (6, 6), (1, 1)]:  # random, no positives, the no-pairs rule
        x, y = torch.randn(b, 7, generator=g), torch.randint(0, k, (b,), generator=g)
        va, (ga,) = value_and_grad(lambda e: compiled(e, y), x)
        vb, (gb,) = value_and_grad(lambda e: loss(e, y), x)
        torch.testing.assert_close(va, vb, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6)
    bad = torch.randn(13, 7)
    bad[2, 3] = float("nan")
    with pytest.raises(RuntimeError, match="embeddings contains NaN or Inf"):
        compiled(bad, torch.randint(0, 4, (13,), generator=g))
