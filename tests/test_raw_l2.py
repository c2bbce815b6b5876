"""The L2 distance of unnormalised rows (LpDistance(normalize_embeddings=False), p = 2) on
the CPU engine: the raw rows through the unit-row ops' `raw` form (each product read as
1 − d²/2 from the rows' norms) for Contrastive, Lifted and GeneralizedLifted and the listed
pairs of an indices_tuple; the raw rows through the all-triplets ops' cdist (their
backward's radial term) for the L2 triplet, and as 1 − d²/2 of that d for its square;
BatchHardMiner's exact picks with the listed pairs' gradients. Values and gradients against the reference (fp64, the
shared cases) and PML (fp32, past cdist's 25-row switch), ref_emb, miners and their index
tuples, auto's choice, and Metrix' refusal on every backend."""
import pytest
import torch
from pytorch_metric_learning import distances as pd
from pytorch_metric_learning import losses as pl
from pytorch_metric_learning import miners as pm

import metrix_ops as mo
from cases import CASE_IDS, CASES, assert_close_vg
from metrix_ops import _ext
from raw_l2_cases import (COINCIDENT, LOSSES, REFS, DirectL2, check_coincident_rows, loss_ids,
                          ours_on, raw, rows_past_cdist_switch, scaled_case)

pytestmark = pytest.mark.skipif(not _ext.HAS_EXT, reason="extension not built")

LOSS_IDS = loss_ids(LOSSES)


ours = ours_on("cpu")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("loss", LOSSES, ids=LOSS_IDS)
def test_matches_reference_fp64(case, loss):
    name, kw, power = loss
    x, y = scaled_case(case)
    fused, ref = ours(name, kw, power), ours(name, kw, power, "reference")
    assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x)


@pytest.mark.parametrize("loss", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("refs", [False, True])
def test_matches_pml_fp32(loss, refs):
    """fp32 past 25 rows, where PML's cdist is the product form too: PML's numbers."""
    name, kw, power = loss
    x, y, r, ry = rows_past_cdist_switch(7)
    mine, theirs = ours(name, kw, power), getattr(pl, name)(distance=raw(pd, power), **kw)
    if not refs:
        assert_close_vg(lambda e: mine(e, y), lambda e: theirs(e, y), x, rtol=2e-5, atol=1e-6)
    else:
        assert_close_vg(lambda e, q: mine(e, y, ref_emb=q, ref_labels=ry),
                        lambda e, q: theirs(e, y, ref_emb=q, ref_labels=ry), x, r,
                        rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("power", [1, 2])
@pytest.mark.parametrize("miner_normalizes", [False, True])
@pytest.mark.parametrize("refs", [False, True])
def test_batch_hard_miner_option(power, miner_normalizes, refs):
    """TripletMarginLoss(miner=BatchHardMiner()) on raw L2 (person re-identification's
    batch-hard triplet): the miner's picks by its own distance, the loss on raw distances,
    against PML's two calls, fp64."""
    g = torch.Generator().manual_seed(power + 2 * miner_normalizes)
    x = 3 * torch.randn(47, 11, dtype=torch.float64, generator=g)
    y = torch.randint(0, 7, (47,), generator=g)
    r = 3 * torch.randn(33, 11, dtype=torch.float64, generator=g)
    ry = torch.randint(0, 7, (33,), generator=g)
    mdist = dict(distance=pd.LpDistance(normalize_embeddings=miner_normalizes))
    loss = ours("TripletMarginLoss", {"margin": 0.3}, power,
                miner=mo.miners.BatchHardMiner(
                    distance=mo.distances.LpDistance(normalize_embeddings=miner_normalizes)))
    pml_loss = pl.TripletMarginLoss(margin=0.3, distance=raw(pd, power))
    pml_miner = pm.BatchHardMiner(**mdist)
    if not refs:
        assert_close_vg(lambda e: loss(e, y), lambda e: pml_loss(e, y, pml_miner(e, y)), x)
    else:
        assert_close_vg(
            lambda e, q: loss(e, y, ref_emb=q, ref_labels=ry),
            lambda e, q: pml_loss(e, y, pml_miner(e, y, q, ry), q, ry), x, r)


@pytest.mark.parametrize("power", [1, 2])
@pytest.mark.parametrize("kind", ["all", "hard", "semihard", "easy"])
def test_triplet_margin_miner_option(power, kind):
    g = torch.Generator().manual_seed(11)
    x = 3 * torch.randn(41, 9, dtype=torch.float64, generator=g)
    y = torch.randint(0, 5, (41,), generator=g)
    margin = 2.0 if power == 1 else 10.0
    loss = ours("TripletMarginLoss", {"margin": margin}, power,
                miner=mo.miners.TripletMarginMiner(margin, kind,
                                                   distance=raw(mo.distances, power)))
    pml_loss = pl.TripletMarginLoss(margin=margin, distance=raw(pd, power))
    pml_miner = pm.TripletMarginMiner(margin, kind, distance=raw(pd, power))
    assert_close_vg(lambda e: loss(e, y), lambda e: pml_loss(e, y, pml_miner(e, y)), x)


def test_auto_takes_the_fused_op_past_25_rows(monkeypatch):
    """auto runs the CPU engine on raw L2 past 25 rows (it ran the reference before)."""
    from metrix_ops.fused import contrastive
    calls = []
    for fn in ("contrastive_rows", "contrastive_rows_self"):  # with and without ref_emb
        monkeypatch.setattr(contrastive, fn, lambda *a, _real=getattr(contrastive, fn), **k:
                            calls.append(1) or _real(*a, **k))
    g = torch.Generator().manual_seed(0)
    x, y = 3 * torch.randn(30, 8, generator=g), torch.randint(0, 4, (30,), generator=g)
    auto = ours("ContrastiveLoss", {}, 1, backend="auto")
    assert torch.equal(auto(x, y), ours("ContrastiveLoss", {}, 1)(x, y))
    assert len(calls) == 2
    auto(x, y, ref_emb=x[:27], ref_labels=y[:27])
    assert len(calls) == 3
    auto(x[:25], y[:25], ref_emb=x[:9], ref_labels=y[:9])  # small: the reference
    assert len(calls) == 3


@pytest.mark.parametrize("loss", LOSSES, ids=LOSS_IDS)
def test_small_calls_with_coincident_rows_are_pml_under_auto(loss):
    """At most 25 rows a side PML's cdist takes exact differences: coincident rows are at
    distance 0 with a zero gradient, where the fused Gram form gives them rounding noise
    (~√(ε‖x‖²) in fp32) and a 1/d gradient of noise. There auto runs the reference
    (driver.pml_exact_where_fused_rounds): PML's values and gradients, fp32."""
    name, kw, power = loss
    g = torch.Generator().manual_seed(0)
    # (a case where the fused Gram form of the L2 losses, not the squared ones, gives
    # the coincident pairs noise: explicit backend="cpu" differs from PML here)
    x, y = 3 * torch.randn(17, 5, generator=g) + 2, torch.randint(0, 3, (17,), generator=g)
    x[1], x[3] = x[0], x[2]  # a coincident positive and a coincident negative
    y[1], y[3] = y[0], (y[2] + 1) % 3
    theirs = getattr(pl, name)(distance=raw(pd, power), **kw)
    assert_close_vg(lambda e: ours(name, kw, power, "auto")(e, y), lambda e: theirs(e, y), x,
                    rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["ContrastiveLoss", "GeneralizedLiftedStructureLoss"])
@pytest.mark.parametrize("backend", ["cpu", "auto", "reference"])
def test_metrix_on_raw_l2_is_refused_alike(name, backend):
    """Metrix mixes L2-normalised rows (DESIGN §1): on raw L2 every backend refuses it with
    the reference's message, though the clean loss is fused."""
    x, y = 3 * torch.randn(29, 6), torch.randint(0, 4, (29,))
    loss = ours(name, {"pos_margin": 0.5, "neg_margin": 6.0}, 1, backend,
                metrix=mo.Metrix(lam=0.4))
    with pytest.raises(NotImplementedError, match="Metrix mixes L2-normalised embeddings"):
        loss(x, y)


def test_half_inputs():
    """bf16 rows are computed in fp32: the fp32 loss of the rounded rows."""
    g = torch.Generator().manual_seed(2)
    x, y = 3 * torch.randn(40, 16, generator=g), torch.randint(0, 5, (40,), generator=g)
    h = x.to(torch.bfloat16)
    for name, kw, power in LOSSES:
        torch.testing.assert_close(ours(name, kw, power)(h, y),
                                   ours(name, kw, power, "reference")(h.float(), y),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name, kw", [("ContrastiveLoss", {"pos_margin": 0.5, "neg_margin": 6.0}),
                                      ("TripletMarginLoss", {"margin": 2.0}),
                                      ("TripletMarginLoss", {"margin": 2.0, "swap": True}),
                                      ("LiftedStructureLoss", {"neg_margin": 6.0}),
                                      ("GeneralizedLiftedStructureLoss", {"neg_margin": 6.0})])
@pytest.mark.parametrize("power", [1, 2])
@pytest.mark.parametrize("miner", ["batch_hard", "semihard", "pairs"])
def test_indices_tuple_of_a_miner(name, kw, power, miner):
    """PML's two calls, loss(x, y, miner(x, y)), on raw L2: the listed pairs' distances from
    their products and the rows' norms (fused/indices/common.py), against PML in fp64."""
    if power == 2 and "Lifted" in name:
        pytest.skip("(the lifted losses' squared L2 is not a case of interest)")
    g = torch.Generator().manual_seed(power)
    x = 3 * torch.randn(43, 10, dtype=torch.float64, generator=g)
    y = torch.randint(0, 6, (43,), generator=g)
    dist = raw(pd, power)
    m = {"batch_hard": lambda: pm.BatchHardMiner(distance=raw(pd, power)),
         "semihard": lambda: pm.TripletMarginMiner(1.0, "semihard", distance=raw(pd, power)),
         "pairs": lambda: pm.PairMarginMiner(1.0, 4.0, distance=raw(pd, power))}[miner]()
    tup = m(x, y)
    mine = ours(name, kw, power)
    theirs = getattr(pl, name)(distance=dist, **kw)
    assert_close_vg(lambda e: mine(e, y, tup), lambda e: theirs(e, y, tup), x)


INDEXED = [("ContrastiveLoss", {"pos_margin": 0.0, "neg_margin": 6.0}, 1),
           ("ContrastiveLoss", {"pos_margin": 0.0, "neg_margin": 30.0}, 2),
           ("TripletMarginLoss", {"margin": 2.0}, 1),
           ("TripletMarginLoss", {"margin": 2.0, "swap": True}, 1),
           ("TripletMarginLoss", {"margin": 8.0}, 2),
           ("GeneralizedLiftedStructureLoss", {"pos_margin": 0.0, "neg_margin": 6.0}, 1)]


@pytest.mark.parametrize("name,kw,power", INDEXED, ids=loss_ids(INDEXED))
@pytest.mark.parametrize("refs", [False, True])
def test_indices_tuple_coincident_rows(name, kw, power, refs):
    """Listed triplets whose positives are coincident rows (each anchor's nearest positive
    and negative by exact differences), fp32 rows of norm ~40, past 25 rows, the batch
    against itself and against references: the listed pairs' d² from products and norms is
    taken as 0 below the norm-scaled threshold, so values and gradients are those of exact
    differences (the reference on DirectL2, fp64); swap's positive-negative distance is
    between two references."""
    g = torch.Generator().manual_seed(power + 3 * refs)
    x = 10 * torch.randn(41, 16, generator=g)
    y = torch.randint(0, 4, (41,), generator=g)
    x[7], x[20], x[33] = x[3], x[3], x[12]
    y[7], y[20], y[33] = y[3], y[3], y[12]
    r, ry = x, y
    if refs:
        r = torch.cat([x[10:40], 10 * torch.randn(3, 16, generator=g)])
        ry = torch.cat([y[10:40], torch.randint(0, 4, (3,), generator=g)])
    d = torch.cdist(x.double(), r.double(), compute_mode="donot_use_mm_for_euclid_dist")
    same = y[:, None] == ry[None, :]
    if not refs:
        d.fill_diagonal_(float("inf"))
    a = torch.arange(41)
    p = torch.where(same, d, torch.inf).argmin(1)
    n = torch.where(~same, d, torch.inf).argmin(1)
    tup = (a, p, n)
    assert any(d[i, p[i]] == 0 for i in range(41))  # coincident positives are listed
    oracle = getattr(mo.losses, name)(
        distance=DirectL2(normalize_embeddings=False, power=power), backend="reference", **kw)
    mine = ours(name, kw, power)
    tol = dict(rtol=2e-5, atol=1e-5)
    if not refs:
        assert_close_vg(lambda e: mine(e, y, tup).double(),
                        lambda e: oracle(e.double(), y, tup), x, **tol)
        return
    assert_close_vg(lambda e, q: mine(e, y, tup, ref_emb=q, ref_labels=ry).double(),
                    lambda e, q: oracle(e.double(), y, tup, ref_emb=q.double(), ref_labels=ry),
                    x, r, **tol)


@pytest.mark.parametrize("name,kw,power", COINCIDENT, ids=loss_ids(COINCIDENT))
@pytest.mark.parametrize("dim", [16, 256])
def test_coincident_rows_past_25_rows_get_distance_0(name, kw, power, dim):
    """The batch against itself runs the symmetric ops on the raw rows, which take d² below
    2√D ulps of the pair's squared norms as 0 (the triplet: cdist's d, and 1 − d²/2 of it
    for its square): coincident rows (even at pos_margin 0, where
    any noise would be a counted term) match exact differences past 25 rows too, values
    and gradients, in fp32 with rows of norm ~40 (D = 16) and ~160 (D = 256: the rounding
    passes 8 ulps there)."""
    check_coincident_rows(ours(name, kw, power), name, kw, power, dim)


@pytest.mark.parametrize("name,kw,power", [
    ("ContrastiveLoss", {"pos_margin": 0.0, "neg_margin": 0.02}, 1),
    ("GeneralizedLiftedStructureLoss", {"pos_margin": 0.0, "neg_margin": 0.02}, 1),
    ("LiftedStructureLoss", {"neg_margin": 0.02}, 1),
    ("TripletMarginLoss", {"margin": 1e-4}, 2)])
def test_short_rows_run_the_reference_under_auto(name, kw, power):
    """Rows of norm ~4e-3 in fp32: the fused forms hold d² to an absolute ε (1 − d²/2, lifted
    rows), so auto runs the reference (driver.raw_rows_too_short): PML's values and
    gradients to fp32 rounding, past 25 rows."""
    g = torch.Generator().manual_seed(power + len(name))
    x, y = 1e-3 * torch.randn(40, 16, generator=g), torch.randint(0, 4, (40,), generator=g)
    theirs = getattr(pl, name)(distance=raw(pd, power), **kw)
    assert_close_vg(lambda e: ours(name, kw, power, "auto")(e, y).double(),
                    lambda e: theirs(e.double(), y), x, rtol=1e-4, atol=1e-10)


def test_short_rows_rule_reads_the_longest_row(monkeypatch):
    """The rule looks at the longest row of embeddings and ref_emb against √(ε/1e-5) (0.11
    in fp32, 4.7e-6 in fp64), under auto only, and leaves TripletMarginLoss on L2 (its ops
    read the norms themselves) to the fused ops."""
    from metrix_ops import driver
    from metrix_ops.fused import contrastive, triplet_margin
    calls = []
    for mod, fn in ((contrastive, "contrastive_rows"), (contrastive, "contrastive_rows_self"),
                    (triplet_margin, "triplet_all_rows")):
        monkeypatch.setattr(mod, fn, lambda *a, _real=getattr(mod, fn), _n=fn, **k:
                            calls.append(_n) or _real(*a, **k))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 8, generator=g), torch.randint(0, 4, (30,), generator=g)
    x = 0.05 * x / x.norm(dim=1, keepdim=True)  # every row of norm 0.05
    con = ours("ContrastiveLoss", {"neg_margin": 0.1}, 1, backend="auto")
    con(x, y)
    assert calls == []
    long_refs = 0.2 * x / 0.05  # references of norm 0.2: the longest row passes the bound
    con(x, y, ref_emb=long_refs, ref_labels=y)
    assert calls == ["contrastive_rows"]
    con(x.double(), y)  # fp64: the bound is 4.7e-6
    assert calls == ["contrastive_rows", "contrastive_rows_self"]
    ours("ContrastiveLoss", {"neg_margin": 0.1}, 1, backend="cpu")(x, y)  # explicit: fused
    assert len(calls) == 3
    ours("TripletMarginLoss", {"margin": 0.01}, 1, backend="auto")(x, y)
    assert calls[3:] == ["triplet_all_rows"]
    assert driver.raw_rows_too_short("ContrastiveLoss", raw(mo.distances, 1), None, None,
                                     0.10, torch.float32)
    assert not driver.raw_rows_too_short("ContrastiveLoss", raw(mo.distances, 1), None, None,
                                         0.12, torch.float32)
    assert not driver.raw_rows_too_short("ContrastiveLoss", raw(mo.distances, 1), None, None,
                                         None, torch.float32)


@pytest.mark.parametrize("name,kw,power", REFS, ids=loss_ids(REFS))
@pytest.mark.parametrize("dim", [16, 256])
def test_coincident_rows_against_references(name, kw, power, dim):
    """ContrastiveLoss, GeneralizedLifted and LiftedStructure against references run their
    general ops on the raw rows (raw=True: 1 − d²/2 from their norms, the zero threshold
    scaled by them), the triplet its all-triplets op (as against itself): a
    batch row and the reference it coincides with are at d = 0, values and gradients of
    both as exact differences give."""
    check_coincident_rows(ours(name, kw, power), name, kw, power, dim, refs=True)
