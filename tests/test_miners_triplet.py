"""BatchHardMiner and TripletMarginMiner against PML 2.9: batch-hard gives the same
(p, n) for every anchor (ties included), the margin miner the same set of triplets, for
every case, distance, margin, type and with ref_emb/ref_labels."""
import pytest
import torch
from pytorch_metric_learning import distances as pd
from pytorch_metric_learning import miners as pm

import metrix_ops as mo
from cases import CASE_IDS, CASES, make_case

DISTS = [None, lambda: pd.CosineSimilarity(), lambda: pd.LpDistance(power=2),
         lambda: pd.LpDistance(normalize_embeddings=False),
         lambda: pd.DotProductSimilarity(normalize_embeddings=False)]
DIST_IDS = ["default", "cos", "lp_sq", "lp_raw", "dot_raw"]
TYPES = ("all", "hard", "semihard", "easy")


def _kw(dist):
    return {} if dist is None else {"distance": dist()}


def per_anchor(t):
    a, p, n = (v.tolist() for v in t)
    assert len(set(a)) == len(a)  # one triplet per anchor
    return {i: (j, k) for i, j, k in zip(a, p, n)}


def as_set(t):
    s = set(zip(*(v.tolist() for v in t)))
    assert len(s) == len(t[0])  # no triplet twice
    return s


def check_output(t, n_rows, n_refs):
    assert len(t) == 3 and all(v.dtype == torch.long and v.ndim == 1 for v in t)
    assert len(t[0]) == len(t[1]) == len(t[2])
    if len(t[0]):
        assert int(t[0].max()) < n_rows and int(max(t[1].max(), t[2].max())) < n_refs


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dist", DISTS, ids=DIST_IDS)
def test_batch_hard_matches_pml_per_anchor(case, dist):
    x, y = make_case(case)
    x = x.detach()
    ours, theirs = mo.miners.BatchHardMiner(**_kw(dist))(x, y), pm.BatchHardMiner(**_kw(dist))(x, y)
    check_output(ours, len(x), len(x))
    assert per_anchor(ours) == per_anchor(theirs)
    assert torch.equal(ours[0], theirs[0])  # anchors ascending, as PML


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dist", DISTS[:3], ids=DIST_IDS[:3])
def test_triplet_margin_miner_matches_pml(case, dist):
    x, y = make_case(case)
    x = x.detach()
    for margin in (0.2, 0.0, 0.6):
        for t in TYPES:
            ours = mo.miners.TripletMarginMiner(margin, t, **_kw(dist))(x, y)
            theirs = pm.TripletMarginMiner(margin=margin, type_of_triplets=t, **_kw(dist))(x, y)
            check_output(ours, len(x), len(x))
            assert as_set(ours) == as_set(theirs), (margin, t)


def test_triplet_types_partition_all_triplets():
    x, y = make_case(CASES[1])
    x = x.detach()
    m = lambda t, margin=0.2: as_set(mo.miners.TripletMarginMiner(margin, t)(x, y))
    everything = as_set(mo.miners.TripletMarginMiner(10.0, "all")(x, y))  # margin beyond any gap
    assert m("all") | m("easy") == everything and not (m("all") & m("easy"))
    assert m("hard") | m("semihard") == m("all") and not (m("hard") & m("semihard"))
    assert m("hard") and m("semihard") and m("easy")  # the case exercises each type


def test_ties_pick_the_lowest_index_as_pml():
    # exact duplicates make every max/min a tie
    base = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = base[torch.tensor([0, 0, 1, 1, 0, 2, 2, 1])]
    y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    for dist in DISTS[:2]:
        ours, theirs = mo.miners.BatchHardMiner(**_kw(dist))(x, y), pm.BatchHardMiner(**_kw(dist))(x, y)
        assert per_anchor(ours) == per_anchor(theirs)


@pytest.mark.parametrize("same_labels", [False, True], ids=["ref_labels", "ref_labels_is_labels"])
def test_with_ref_emb(same_labels):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 4, generator=g, dtype=torch.float64)
    r = torch.randn(9 if same_labels else 14, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (9,), generator=g)
    ry = y if same_labels else torch.randint(0, 3, (14,), generator=g)
    for dist in DISTS[:2]:
        ours = mo.miners.BatchHardMiner(**_kw(dist))(x, y, r, ry)
        check_output(ours, len(x), len(r))
        assert per_anchor(ours) == per_anchor(pm.BatchHardMiner(**_kw(dist))(x, y, r, ry))
        for t in TYPES:
            ours = mo.miners.TripletMarginMiner(0.3, t, **_kw(dist))(x, y, r, ry)
            theirs = pm.TripletMarginMiner(margin=0.3, type_of_triplets=t, **_kw(dist))(x, y, r, ry)
            assert as_set(ours) == as_set(theirs)
    if same_labels:  # PML excludes (i, i) when ref_labels is labels, even with ref_emb
        a, p, _ = mo.miners.TripletMarginMiner(10.0)(x, y, r, ry)
        assert len(a) and (a != p).all()


def test_no_triplets_gives_empty_long_tensors():
    x = torch.randn(5, 3, dtype=torch.float64)
    for y in (torch.arange(5), torch.zeros(5, dtype=torch.long)):  # no positives / no negatives
        for miner in (mo.miners.BatchHardMiner(), mo.miners.TripletMarginMiner(type_of_triplets="easy")):
            out = miner(x, y)
            check_output(out, 5, 5)
            assert len(out[0]) == 0


def test_no_gradient_and_validation():
    x, y = make_case(CASES[0])  # requires grad
    out = mo.miners.BatchHardMiner()(x, y)
    assert not any(v.requires_grad for v in out)
    with pytest.raises(ValueError, match="type_of_triplets"):
        mo.miners.TripletMarginMiner(type_of_triplets="hardest")
    with pytest.raises(ValueError, match="labels"):
        mo.miners.BatchHardMiner()(x, None)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_give_valid_triplets(dtype):
    x, y = make_case(CASES[1])
    x = x.detach().to(dtype)
    bh = mo.miners.BatchHardMiner()(x, y)
    check_output(bh, len(x), len(x))
    a, p, n = bh
    assert len(a) and (y[a] == y[p]).all() and (y[a] != y[n]).all() and (a != p).all()
    a, p, n = mo.miners.TripletMarginMiner(0.2, "semihard")(x, y)
    assert len(a) and (y[a] == y[p]).all() and (y[a] != y[n]).all()


def test_mined_triplets_feed_our_losses_like_pml_losses():
    from pytorch_metric_learning import losses as pl
    x, y = make_case(CASES[1])
    for miner in (mo.miners.BatchHardMiner(), mo.miners.TripletMarginMiner(0.2, "semihard")):
        it = miner(x, y)
        torch.testing.assert_close(
            mo.losses.TripletMarginLoss(margin=0.2, backend="reference")(x, y, it),
            pl.TripletMarginLoss(margin=0.2)(x, y, it))
