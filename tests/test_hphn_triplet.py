"""HPHNTripletLoss: without expansion it is PML's batch-hard triplet; with expansion it is
the official MXNet HPHN triplet (clovaai/embedding-expansion, loss/hphn_triplet.py and
loss/embedding_aug.py), ported literally to torch below: points materialised per row,
the dense clipped Euclidean matrix, and min over each anchor's group of rows."""
import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import distances as pml_dist
from pytorch_metric_learning import losses as pl
from pytorch_metric_learning import miners as pm
from pytorch_metric_learning import reducers as pr

import metrix_ops as mo
from cases import CASE_IDS, CASES, assert_close_vg, make_case


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- the official code, ported
def official_embedding_aug(xh, y, n, pairs, normalize):
    """get_embedding_aug: for every row i and its partner t (the swapped row 2t↔2t+1 in the
    official code; every positive t ≠ i for pairs="all") the points
    (k·x_t + (n+1−k)·x_i)/(n+1), k = 1..n, each owned by row i. Returns the points, their
    labels and owners (originals own themselves)."""
    b = len(xh)
    if pairs == "adjacent":
        partner = [(i, i + 1 if i % 2 == 0 else i - 1) for i in range(b)]
    else:
        partner = [(i, t) for i in range(b) for t in range(b) if t != i and y[t] == y[i]]
    rows, labels, owner = [xh], [y], list(range(b))
    if partner and n:
        i, t = (torch.tensor(v) for v in zip(*partner))
        for n_idx in range(n):
            left = float(n_idx + 1)
            right = float(n + 1) - left
            inner = (xh[t] * left + xh[i] * right) / float(n + 1)
            rows.append(F.normalize(inner, dim=1) if normalize else inner)
            labels.append(y[i])
            owner += i.tolist()
    return torch.cat(rows), torch.cat(labels), torch.tensor(owner)


def official_hphn(x, y, n, pairs, normalize, margin):
    """The official per-row losses (B of them) of HPHNTripletLoss.hybrid_forward."""
    b = len(x)
    xh = F.normalize(x, dim=1)  # the official network L2-normalises its embeddings
    V, labels, owner = official_embedding_aug(xh, y, n, pairs, normalize)
    sq = (V**2).sum(1, keepdim=True)
    dist = (sq + sq.t() - 2 * V @ V.t()).clamp(1e-12, 1e12).sqrt()  # euclidean_dist
    is_pos = (labels[:, None] == labels[None, :]).to(dist.dtype)
    is_neg = 1 - is_pos
    dist_ap = (dist * is_pos)[:b, :b].max(1).values  # positives among originals only
    dist_neg = dist * is_neg + dist.max(1, keepdim=True).values * is_pos
    row_an = dist_neg.min(1).values
    # min over the rows of each anchor's group (the official reshape to (n+1, B) + min)
    dist_an = torch.stack([row_an[owner == i].min() for i in range(b)])
    return F.relu(dist_ap - dist_an + margin)


def assert_close_duplicates(ours, official, b):
    """Duplicate rows: the official code clips every distance at √1e-12 = 1e-6, so a zero
    distance between coincident points is 1e-6 there (at most one such term per anchor),
    and ties between equal points may split gradients differently: values only."""
    torch.testing.assert_close(ours, official, rtol=1e-6, atol=1e-6 * b)


def kept(y):
    """Anchors with a positive and a negative (those PML's BatchHardMiner keeps)."""
    same = y[:, None] == y[None, :]
    return (same.sum(1) > 1) & (~same).any(1)


def ee(n, pairs="adjacent", normalize=True):
    return mo.Expansion(n_points=n, pairs=pairs, normalize=normalize)


def contiguous(case, seed):
    x, y = make_case(case, seed=seed)
    b = len(y) - len(y) % 2
    y = y[:b].clone()
    y[1::2] = y[0::2]
    return x[:b].detach().clone().requires_grad_(True), y


# ---------------------------------------------------------------- without expansion: PML
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("distance", [None, pml_dist.CosineSimilarity()], ids=["l2", "cosine"])
def test_is_pml_batch_hard_triplet(case, distance):
    x, y = make_case(case, seed=1)
    miner = pm.BatchHardMiner(**({} if distance is None else {"distance": distance}))
    dkw = {} if distance is None else {"distance": distance}
    for margin in (0.2, 0.05):
        for reduction, reducer in (("mean", pr.MeanReducer()), ("sum", pr.SumReducer())):
            pml = pl.TripletMarginLoss(margin=margin, reducer=reducer, **dkw)
            ref = lambda e: pml(e, y, miner(e, y))  # noqa: E731
            for expansion in (None, mo.Expansion(n_points=0, pairs="all")):
                loss = mo.losses.HPHNTripletLoss(margin=margin, reduction=reduction,
                                                 backend="reference", expansion=expansion, **dkw)
                assert_close_vg(lambda e: loss(e, y), ref, x)


def test_ref_emb_is_pml_batch_hard_triplet():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(17, 9, dtype=torch.float64, generator=g)
    r = torch.randn(23, 9, dtype=torch.float64, generator=g)
    y, ry = torch.randint(0, 4, (17,), generator=g), torch.randint(0, 4, (23,), generator=g)
    ours = mo.losses.HPHNTripletLoss(margin=0.3, backend="reference")
    pml = pl.TripletMarginLoss(margin=0.3, reducer=pr.MeanReducer())
    assert_close_vg(lambda e, f: ours(e, y, ref_emb=f, ref_labels=ry),
                    lambda e, f: pml(e, y, pm.BatchHardMiner()(e, y, f, ry), f, ry), x, r)


def test_anchors_without_positive_or_negative_are_dropped():
    # PML's BatchHardMiner keeps only anchors with both; the mean is over those
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.2]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 2])  # rows 2 and 3 have no positive
    d = torch.cdist(F.normalize(x, dim=1), F.normalize(x, dim=1))
    expect = (F.relu(d[0, 1] - d[0, 2] + 0.2) + F.relu(d[1, 0] - d[1, 2] + 0.2)) / 2
    loss = mo.losses.HPHNTripletLoss(backend="reference")
    torch.testing.assert_close(loss(x, y), expect)
    for yy in (torch.zeros(4, dtype=torch.long), torch.arange(4)):  # nobody has both
        xx = x.clone().requires_grad_()
        out = loss(xx, yy)
        out.backward()
        assert out.item() == 0 and not xx.grad.any()


# ---------------------------------------------------------------- with expansion: the official code
@pytest.mark.parametrize("case", [c for c in CASES if c[1] > 1], ids=[c[0] for c in CASES if c[1] > 1])
def test_official_adjacent_sum_setting(case):
    # the official runs: adjacent pairs, reduction="sum", margin=1e-5
    x, y = contiguous(case, seed=3)
    keep = kept(y)
    for n in (1, 2, 5):
        for normalize in (True, False):
            loss = mo.losses.HPHNTripletLoss(margin=1e-5, reduction="sum", backend="reference",
                                             expansion=ee(n, "adjacent", normalize))
            official = lambda e: official_hphn(e, y, n, "adjacent", normalize, 1e-5)[keep].sum()  # noqa: E731
            if case[0] == "duplicates":
                assert_close_duplicates(loss(x, y), official(x), len(x))
                continue
            assert_close_vg(lambda e: loss(e, y), official, x)
            if keep.all():  # every anchor has both: literally the official output's sum
                torch.testing.assert_close(
                    loss(x, y), official_hphn(x, y, n, "adjacent", normalize, 1e-5).sum())


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_official_generalised_to_all_pairs(case):
    # the official per-row generation over every positive partner holds each synthetic point
    # twice (the λ grid is symmetric); ours holds each once and gives it to both endpoints
    x, y = make_case(case, seed=4)
    keep = kept(y)
    for n in (0, 1, 2, 5):
        for normalize in (True, False):
            for margin, reduction in ((0.2, "mean"), (1e-5, "sum")):
                loss = mo.losses.HPHNTripletLoss(margin=margin, reduction=reduction,
                                                 backend="reference", expansion=ee(n, "all", normalize))

                def official(e):
                    t = official_hphn(e, y, n, "all", normalize, margin)[keep]
                    if not len(t):
                        return (e * 0).sum()
                    return t.sum() if reduction == "sum" else t.mean()

                if case[0] == "duplicates":
                    assert_close_duplicates(loss(x, y), official(x), len(x))
                else:
                    assert_close_vg(lambda e: loss(e, y), official, x)


def test_sum_is_mean_times_kept_anchors():
    x, y = make_case(CASES[1], seed=2)
    for expansion in (None, ee(2, "all")):
        mean = mo.losses.HPHNTripletLoss(margin=1e-5, backend="reference", expansion=expansion)
        total = mo.losses.HPHNTripletLoss(margin=1e-5, reduction="sum", backend="reference",
                                          expansion=expansion)
        torch.testing.assert_close(total(x, y), mean(x, y) * kept(y).sum())


def test_expansion_only_makes_negatives_harder():
    # more points on the anchor and negative sides can only shorten the closest pair
    x, y = make_case(CASES[1], seed=6)
    base = mo.losses.HPHNTripletLoss(margin=0.3, reduction="sum", backend="reference")(x, y)
    for n in (1, 3):
        out = mo.losses.HPHNTripletLoss(margin=0.3, reduction="sum", backend="reference",
                                        expansion=ee(n, "all"))(x, y)
        assert out > base


def test_gradcheck():
    x, y = contiguous(CASES[0], seed=7)
    for expansion in (None, ee(2, "adjacent"), ee(3, "all", False)):
        loss = mo.losses.HPHNTripletLoss(margin=0.5, backend="reference", expansion=expansion)
        assert torch.autograd.gradcheck(lambda e: loss(e, y), (x.detach().requires_grad_(),))


# ---------------------------------------------------------------- API
def test_functional_equals_module():
    x, y = make_case(CASES[1], seed=8)
    for kw in ({}, {"margin": 0.1, "reduction": "sum"},
               {"margin": 0.1, "expansion": ee(2, "all"), "distance": pml_dist.CosineSimilarity()}):
        a = mo.functional.hphn_triplet_loss(x, y, backend="reference", **kw)
        b = mo.losses.HPHNTripletLoss(backend="reference", **kw)(x, y)
        torch.testing.assert_close(a, b)
    auto = mo.losses.HPHNTripletLoss(expansion=ee(2, "all"))(x, y)  # backend="auto"
    torch.testing.assert_close(auto, mo.losses.HPHNTripletLoss(backend="reference",
                                                               expansion=ee(2, "all"))(x, y))


def test_bad_arguments():
    x, y = make_case(CASES[1])
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        mo.losses.HPHNTripletLoss(reduction="none")
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        mo.functional.hphn_triplet_loss(x, y, reduction="max")
    with pytest.raises(TypeError, match="not reducer="):
        mo.losses.HPHNTripletLoss(reducer=pr.SumReducer())
    with pytest.raises(TypeError, match="not reducer="):
        mo.functional.hphn_triplet_loss(x, y, reducer=pr.SumReducer())
    with pytest.raises(ValueError, match="does not take indices_tuple"):
        mo.losses.HPHNTripletLoss()(x, y, pm.BatchHardMiner()(x, y))
    with pytest.raises(ValueError, match=r"rows 0 and 1 have labels"):
        mo.losses.HPHNTripletLoss(expansion=ee(2, "adjacent"))(x[:4], torch.tensor([0, 1, 1, 1]))
    assert "reduction='sum'" in repr(mo.losses.HPHNTripletLoss(reduction="sum"))
