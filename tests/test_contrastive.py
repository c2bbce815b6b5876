import pytest
import torch
from pytorch_metric_learning import distances as pml_dist
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners

import metrix_ops as mo
from cases import CASE_IDS, CASES, assert_close_vg, make_case


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("kw", [{}, {"pos_margin": 0.1, "neg_margin": 0.5}])
def test_matches_pml(case, kw):
    x, y = make_case(case)
    ours = mo.losses.ContrastiveLoss(backend="reference", **kw)
    pml = pml_losses.ContrastiveLoss(**kw)
    assert_close_vg(lambda e: ours(e, y), lambda e: pml(e, y), x)


@pytest.mark.parametrize("case", CASES[:3], ids=CASE_IDS[:3])
def test_cosine_and_reducers_match_pml(case):
    from pytorch_metric_learning import reducers as pml_red
    x, y = make_case(case, seed=3)
    for red in ("MeanReducer", "SumReducer", "AvgNonZeroReducer"):
        ours = mo.losses.ContrastiveLoss(pos_margin=0.9, neg_margin=0.4, backend="reference",
                                         distance=pml_dist.CosineSimilarity(),
                                         reducer=getattr(mo.reducers, red)())
        pml = pml_losses.ContrastiveLoss(pos_margin=0.9, neg_margin=0.4,
                                         distance=pml_dist.CosineSimilarity(),
                                         reducer=getattr(pml_red, red)())
        assert_close_vg(lambda e: ours(e, y), lambda e: pml(e, y), x)


def test_indices_tuple_and_ref_emb_match_pml():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(17, 9, dtype=torch.float64, generator=g)
    r = torch.randn(23, 9, dtype=torch.float64, generator=g)
    y, ry = torch.randint(0, 4, (17,), generator=g), torch.randint(0, 4, (23,), generator=g)
    ours, pml = mo.losses.ContrastiveLoss(backend="reference"), pml_losses.ContrastiveLoss()
    for miner in (pml_miners.MultiSimilarityMiner(), pml_miners.TripletMarginMiner(margin=0.5)):
        it = miner(x, y)
        assert_close_vg(lambda e: ours(e, y, it), lambda e: pml(e, y, it), x)
    assert_close_vg(lambda e, f: ours(e, y, ref_emb=f, ref_labels=ry),
                    lambda e, f: pml(e, y, ref_emb=f, ref_labels=ry), x, r)


def test_functional_equals_module():
    x, y = make_case(CASES[1])
    a = mo.functional.contrastive_loss(x, y, neg_margin=0.5, backend="reference")
    b = mo.losses.ContrastiveLoss(neg_margin=0.5, backend="reference")(x, y)
    torch.testing.assert_close(a, b)


def test_gradcheck():
    x, y = make_case(CASES[2])
    loss = mo.losses.ContrastiveLoss(neg_margin=1.3, backend="reference")
    assert torch.autograd.gradcheck(lambda e: loss(e, y), (x.detach().requires_grad_(),))
