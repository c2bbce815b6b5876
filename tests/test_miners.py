"""Our miners return the same index sets as PML's (batch-hard: the same triplet per anchor)."""
import pytest
import torch
from pytorch_metric_learning import distances as pd
from pytorch_metric_learning import miners as pm

import metrix_ops as mo
from cases import CASE_IDS, CASES, make_case


def as_set(t):
    """Triplets as a set of (a, p, n); pairs as (set of (a, p), set of (a, n))."""
    if len(t) == 4:
        return as_set(t[:2]), as_set(t[2:])
    return set(zip(*[x.tolist() for x in t]))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_miners_match_pml(case):
    x, y = make_case(case)
    x = x.detach()
    pairs = [
        (mo.miners.MultiSimilarityMiner(), pm.MultiSimilarityMiner()),
        (mo.miners.MultiSimilarityMiner(epsilon=0.3, distance=pd.LpDistance()),
         pm.MultiSimilarityMiner(epsilon=0.3, distance=pd.LpDistance())),
        (mo.miners.BatchHardMiner(), pm.BatchHardMiner()),
        (mo.miners.BatchHardMiner(distance=pd.CosineSimilarity()),
         pm.BatchHardMiner(distance=pd.CosineSimilarity())),
    ] + [(mo.miners.TripletMarginMiner(margin=0.3, type_of_triplets=t),
          pm.TripletMarginMiner(margin=0.3, type_of_triplets=t))
         for t in ("all", "hard", "semihard", "easy")]
    for ours, pml in pairs:
        a, b = ours(x, y), pml(x, y)
        assert len(a) == len(b) and [len(v) for v in a] == [len(v) for v in b]
        assert as_set(a) == as_set(b), type(ours).__name__


def test_miners_with_ref_emb():
    g = torch.Generator().manual_seed(2)
    x, r = torch.randn(9, 4, generator=g, dtype=torch.float64), torch.randn(14, 4, generator=g, dtype=torch.float64)
    y, ry = torch.randint(0, 3, (9,), generator=g), torch.randint(0, 3, (14,), generator=g)
    for ours, pml in ((mo.miners.MultiSimilarityMiner(), pm.MultiSimilarityMiner()),
                      (mo.miners.BatchHardMiner(), pm.BatchHardMiner()),
                      (mo.miners.TripletMarginMiner(margin=0.5), pm.TripletMarginMiner(margin=0.5))):
        assert as_set(ours(x, y, r, ry)) == as_set(pml(x, y, r, ry))


def test_miner_output_feeds_our_losses():
    x, y = make_case(CASES[1])
    it = mo.miners.MultiSimilarityMiner()(x, y)
    loss = mo.losses.MultiSimilarityLoss(backend="reference")(x, y, it)
    assert loss.requires_grad and torch.isfinite(loss)
    with pytest.raises(ValueError, match="type_of_triplets"):
        mo.miners.TripletMarginMiner(type_of_triplets="hardest")
