"""TripletMarginLoss(miner=...) inside the fused path: TripletMarginMiner (all / hard /
semihard / easy) through the triplet_mined op (kept triplets counted per row), and
BatchHardMiner by streaming row blocks. Values and gradients equal PML's two calls
`loss(x, y, miner(x, y))` and our reference backend, over the cases, both distances,
ref_emb, reducers, fp64/fp32; the calls outside the scope take the index tuple."""
import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import distances as pd
from pytorch_metric_learning import losses as pl
from pytorch_metric_learning import miners as pm
from pytorch_metric_learning import reducers as pr

import metrix_ops as mo
from cases import CASE_IDS, CASES, assert_close_vg, make_case
from metrix_ops import fused
from metrix_ops.ops.triplet_mined import HAS_OP
from test_loss_miner_option import needs_ext, pml_mined

needs_op = pytest.mark.skipif(not HAS_OP, reason="extension without triplet_mined_fwd")
KEY = ("cpu", "TripletMarginLoss")
TYPES = ("all", "hard", "semihard", "easy")
# (id, our miner, PML's miner) for a distance name: "l2" (the default) or "cos"
MINERS = [(f"tm_{t}_{m}", (lambda d, t=t, m=m: mo.miners.TripletMarginMiner(m, t, **d)),
           (lambda d, t=t, m=m: pm.TripletMarginMiner(m, t, **d)))
          for t in TYPES for m in (0.2, 0.0)] + [
    ("batch_hard", lambda d: mo.miners.BatchHardMiner(**d), lambda d: pm.BatchHardMiner(**d))]
MINER_IDS = [m[0] for m in MINERS]
AvgNonZero = pr.AvgNonZeroReducer


def dist_kw(name, ours: bool):
    if name == "l2":
        return {}
    if name == "l2sq":  # FaceNet's squared L2: the cosine ops at half the margins, doubled
        return {"distance": mo.distances.LpDistance(power=2) if ours else pd.LpDistance(power=2)}
    return {"distance": mo.distances.CosineSimilarity() if ours else pd.CosineSimilarity()}


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls of the registered fused miner impl."""
    calls = []
    supports, impl = fused.MINER_IMPLS[KEY]
    monkeypatch.setitem(fused.MINER_IMPLS, KEY,
                        (supports, lambda *a: calls.append(1) or impl(*a)))
    return calls


def losses_for(dist, mk_ours, mk_pml, margin=0.1, pml_miner=False, **kw):
    """(ours fused, ours reference, PML's two calls) with the same settings; a reducer is
    given as its constructor."""
    def built():
        return {k: v() if k == "reducer" else v for k, v in kw.items()}

    def ours(backend):
        miner = mk_pml(dist_kw(dist, False)) if pml_miner else mk_ours(dist_kw(dist, True))
        return mo.losses.TripletMarginLoss(margin, backend=backend, miner=miner,
                                           **dist_kw(dist, True), **built())
    theirs = pml_mined(pl.TripletMarginLoss(margin, **dist_kw(dist, False), **built()),
                       mk_pml(dist_kw(dist, False)))
    return ours("cpu"), ours("reference"), theirs


@needs_op
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dist", ["l2", "cos", "l2sq"])
@pytest.mark.parametrize("miner", MINERS, ids=MINER_IDS)
def test_fused_equals_pml_and_reference(case, dist, miner, spy):
    x, y = make_case(case)
    _, mk_ours, mk_pml = miner
    for pml_miner in (False, True):
        fused_loss, ref_loss, theirs = losses_for(dist, mk_ours, mk_pml, pml_miner=pml_miner)
        assert_close_vg(lambda e: fused_loss(e, y), lambda e: theirs(e, y), x)
        assert_close_vg(lambda e: fused_loss(e, y), lambda e: ref_loss(e, y), x)
    assert spy, "the fused miner path was not used"


@needs_op
@pytest.mark.parametrize("reducer", ["MeanReducer", "SumReducer", "AvgNonZeroReducer",
                                     "ThresholdReducer"])
@pytest.mark.parametrize("miner", MINERS[::3] + MINERS[-1:], ids=MINER_IDS[::3] + ["bh"])
def test_reducers(reducer, miner, spy):
    x, y = make_case(CASES[1])
    red = (lambda: getattr(pr, reducer)(low=0.02)) if reducer == "ThresholdReducer" \
        else getattr(pr, reducer)
    for dist in ("l2", "cos", "l2sq"):  # Mean counts every kept triplet, zero terms too
        fused_loss, _, theirs = losses_for(dist, miner[1], miner[2], margin=0.3, reducer=red)
        assert_close_vg(lambda e: fused_loss(e, y), lambda e: theirs(e, y), x)
    assert spy


@needs_op
@pytest.mark.parametrize("same_labels", [False, True])
@pytest.mark.parametrize("miner", MINERS, ids=MINER_IDS)
def test_ref_emb(same_labels, miner, spy):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(19, 6, dtype=torch.float64, generator=g)
    y = torch.randint(0, 4, (19,), generator=g)
    r = torch.randn(19 if same_labels else 26, 6, dtype=torch.float64, generator=g)
    ry = y if same_labels else torch.randint(0, 5, (26,), generator=g)
    for dist in ("l2", "cos"):
        fused_loss, ref_loss, theirs = losses_for(dist, miner[1], miner[2])
        assert_close_vg(lambda e, f: fused_loss(e, y, ref_emb=f, ref_labels=ry),
                        lambda e, f: theirs(e, y, f, ry), x, r)
        assert_close_vg(lambda e, f: fused_loss(e, y, ref_emb=f, ref_labels=ry),
                        lambda e, f: ref_loss(e, y, ref_emb=f, ref_labels=ry), x, r)
    assert spy


@needs_op
@pytest.mark.parametrize("miner", MINERS, ids=MINER_IDS)
def test_fp32_and_bf16(miner):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(45, 12, generator=g)
    y = torch.randint(0, 6, (45,), generator=g)
    for dist in ("l2", "cos"):
        fused_loss, _, theirs = losses_for(dist, miner[1], miner[2])
        # fp32 against PML in fp32 (the same mining, fp32 rounding of the terms)
        assert_close_vg(lambda e: fused_loss(e, y), lambda e: theirs(e, y), x,
                        rtol=1e-4, atol=1e-6)
        out = fused_loss(x.bfloat16().requires_grad_(), y)
        assert out.dtype == torch.float32 and torch.isfinite(out)


@needs_op
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("miner", MINERS, ids=MINER_IDS)
def test_smooth_loss(case, miner, spy):
    """smooth_loss: softplus of every kept triplet (summed one by one in the op)."""
    x, y = make_case(case)
    for dist in ("l2", "cos"):
        for red in (AvgNonZero, pr.MeanReducer):
            fused_loss, _, theirs = losses_for(dist, miner[1], miner[2], smooth_loss=True,
                                               reducer=red)
            assert_close_vg(lambda e: fused_loss(e, y), lambda e: theirs(e, y), x)
    assert spy


@needs_op
@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_op_chunks(chunk, monkeypatch):
    from metrix_ops.fused import triplet_margin as tm
    monkeypatch.setitem(fused.MINER_IMPLS, KEY, (
        tm.miner_supports, lambda p, i, r, m: tm.triplet_miner_impl(p, i, r, m, chunk=chunk)))
    x, y = make_case(CASES[1])
    for t in TYPES:
        for dist, smooth in (("l2", False), ("cos", False), ("l2", True)):
            fused_loss, _, theirs = losses_for(
                dist, lambda d, t=t: mo.miners.TripletMarginMiner(0.3, t, **d),
                lambda d, t=t: pm.TripletMarginMiner(0.3, t, **d), smooth_loss=smooth)
            assert_close_vg(lambda e: fused_loss(e, y), lambda e: theirs(e, y), x)


@needs_op
@pytest.mark.parametrize("cosine", [False, True])
def test_op_counts_are_the_miners(cosine):
    """Per anchor, the op's kept count is the miner's triplets of that anchor and its
    nonzero count those with loss > 0."""
    g = torch.Generator().manual_seed(6)
    x = F.normalize(torch.randn(40, 5, dtype=torch.float64, generator=g), dim=1)
    _check_counts(x, torch.randint(0, 5, (40,), generator=g), cosine, chunk=7)


def _check_counts(x, y, cosine, chunk):
    """The op's per-anchor kept and nonzero counts and sums against the miner's triplets,
    for every kind and margins below, at and above 0."""
    from metrix_ops.ops.triplet_mined import triplet_mined_rows
    b = len(x)
    d = mo.distances.CosineSimilarity() if cosine else mo.distances.LpDistance()
    mat = d(x, x)
    for t in TYPES:
        for m2 in (-0.1, 0.0, 0.3):
            a, p, n = mo.miners.TripletMarginMiner(m2, t, distance=d)(x, y)
            rows, nonzero, kept = triplet_mined_rows(x, x, y, y, True, cosine, 0.2, t, m2,
                                                     chunk=chunk)
            assert kept.tolist() == torch.bincount(a, minlength=b).tolist(), (t, m2)
            viol = d.margin(mat[a, p], mat[a, n]) + 0.2
            assert nonzero.tolist() == torch.bincount(a[viol > 0], minlength=b).tolist()
            torch.testing.assert_close(rows, torch.zeros(b, dtype=torch.float64).index_add(
                0, a, viol.clamp(min=0)))


@needs_op
@pytest.mark.parametrize("cosine", [True, False])
def test_op_counts_both_paths(cosine):
    """Rows with more than 64 positives take the sorted-rank windows, the others every
    (p, n) in SIMD lanes with the keep rule per triplet: a batch with a class of 70 runs
    both; per anchor the kept and nonzero counts are the miner's and the sums its terms'."""
    g = torch.Generator().manual_seed(8)
    x = F.normalize(torch.randn(101, 4, dtype=torch.float64, generator=g), dim=1)
    y = torch.cat([torch.zeros(70, dtype=torch.long), torch.randint(1, 6, (31,), generator=g)])
    _check_counts(x, y, cosine, chunk=16)


@pytest.mark.parametrize("kw,miner", [
    ({"swap": True}, lambda: pm.TripletMarginMiner(0.2, "semihard")),
    ({"swap": True}, lambda: pm.BatchHardMiner()),
    ({"distance": pd.LpDistance(p=1)}, lambda: pm.BatchHardMiner()),
    # squared L2 with smooth_loss: softplus of the doubled argument is not twice the cosine
    # op's softplus
    ({"distance": pd.LpDistance(power=2), "smooth_loss": True},
     lambda: pm.TripletMarginMiner(0.2, "semihard", distance=pd.LpDistance(power=2))),
    ({}, lambda: pm.TripletMarginMiner(0.2, "hard", distance=pd.CosineSimilarity())),
    ({}, lambda: pm.BatchEasyHardMiner()),
])
def test_outside_the_scope_takes_the_index_tuple(kw, miner):
    from metrix_ops.fused import triplet_margin as tm
    from metrix_ops.spec import LossInputs
    x, y = make_case(CASES[0])
    dist = mo.distances.as_distance(kw.get("distance"), mo.distances.LpDistance)
    inp = LossInputs(x, y, None, x, y, True, dist)
    assert not tm.miner_supports(dict(kw), inp, miner())
    ours = mo.losses.TripletMarginLoss(backend="auto", miner=miner(), **kw)
    theirs = pml_mined(pl.TripletMarginLoss(**kw), miner())
    assert_close_vg(lambda e: ours(e, y), lambda e: theirs(e, y), x)


@needs_ext
@pytest.mark.parametrize("kw", [{}, {"smooth_loss": True}, {"margin": 0.0}])
def test_batch_hard_mixed_distances_and_smooth(kw, spy):
    """BatchHard mines on its own distance (any), the loss reads its own values: cosine
    miner with the L2 loss and the reverse; smooth_loss too (per-triplet terms)."""
    x, y = make_case(CASES[1])
    for mdist, ldist in ((pd.CosineSimilarity, None), (pd.LpDistance, pd.CosineSimilarity),
                         (lambda: pd.LpDistance(normalize_embeddings=False), None)):
        lk = {} if ldist is None else {"distance": ldist()}
        ours = mo.losses.TripletMarginLoss(backend="cpu", miner=pm.BatchHardMiner(
            distance=mdist()), **lk, **kw)
        theirs = pml_mined(pl.TripletMarginLoss(**lk, **kw), pm.BatchHardMiner(distance=mdist()))
        assert_close_vg(lambda e: ours(e, y), lambda e: theirs(e, y), x)
    assert len(spy) == 3


@needs_ext
def test_batch_hard_streams_no_full_matrix(monkeypatch, spy):
    """The fused batch-hard path reads row blocks only: the distance's full call raises,
    and every block has fewer rows than the batch."""
    from metrix_ops.distances import BaseDistance
    g = torch.Generator().manual_seed(8)
    x = torch.randn(120, 8, dtype=torch.float64, generator=g)
    y = torch.randint(0, 9, (120,), generator=g)
    expected = pml_mined(pl.TripletMarginLoss(0.2), pm.BatchHardMiner())(x, y)
    miner = mo.miners.BatchHardMiner()
    miner.block_entries = 16 * 120
    rows, cdist = [], torch.cdist
    monkeypatch.setattr(BaseDistance, "__call__", lambda *a: pytest.fail("full matrix"))
    monkeypatch.setattr(torch, "cdist", lambda q, r, **k: rows.append(len(q)) or cdist(q, r, **k))
    out = mo.losses.TripletMarginLoss(0.2, backend="cpu", miner=miner)(x, y)
    torch.testing.assert_close(out, expected)
    assert spy and rows and max(rows) == 16


@needs_op
def test_no_triplet_gives_zero_with_graph():
    for y in (torch.arange(6), torch.zeros(6, dtype=torch.long)):
        x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
        for miner in (mo.miners.TripletMarginMiner(0.2), mo.miners.BatchHardMiner()):
            out = mo.losses.TripletMarginLoss(backend="cpu", miner=miner)(x, y)
            assert out.item() == 0 and out.requires_grad


@needs_op
def test_op_checks_and_opcheck():
    from metrix_ops.ops.triplet_mined import triplet_mined_rows
    x = F.normalize(torch.randn(9, 5, dtype=torch.float64), dim=1).requires_grad_()
    r = F.normalize(torch.randn(9, 5, dtype=torch.float64), dim=1).requires_grad_()
    y = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3, 3])
    op = torch.ops.metrix_ops.triplet_mined_fwd
    for cosine in (False, True):
        for kind in range(4):
            for smooth in (False, True):
                torch.library.opcheck(op.default, (x, r, y, y, True, cosine, 0.3, kind, 0.1,
                                                   smooth, 4))
                torch.library.opcheck(op.default, (x, r, y, y.flip(0), False, cosine, 0.3,
                                                   kind, 0.1, smooth, 4))
    # rows of any norm, their squared L2 through the cosine keys (raw_sq)
    xr, rr = (3 * x).detach().requires_grad_(), (2 * r).detach().requires_grad_()
    for kind in range(4):
        torch.library.opcheck(op.default, (xr, rr, y, y.flip(0), False, True, 0.3, kind, 0.1,
                                           False, 4, True))
    with pytest.raises(RuntimeError, match="mine_kind"):
        op(x, x, y, y, True, False, 0.1, 4, 0.1, False, 4)
    with pytest.raises(RuntimeError, match="mine_margin"):
        op(x, x, y, y, True, False, 0.1, 0, float("inf"), False, 4)
    with pytest.raises(RuntimeError, match="ref_labels"):
        op(x, x, y, y[:4], True, False, 0.1, 0, 0.1, False, 4)
    with pytest.raises(ValueError, match="type_of_triplets"):
        triplet_mined_rows(x, x, y, y, True, False, 0.1, "hardest", 0.1)

    def f(e):
        rows, nz, _ = triplet_mined_rows(e, e, y, y, True, False, 0.3, "semihard", 0.2,
                                         chunk=4)
        return rows.sum() / nz.sum().clamp_min(1)

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), f(x))
