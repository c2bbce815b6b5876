"""TripletMarginLoss(miner=...) on the Triton engine (triton/triplet_miners.py) against PML's
two calls `loss(x, y, miner(x, y))`:
- BatchHardMiner (the HPHN mining kernel's picks, then the loss on the B triplets): the
  shared cases, the loss's and the miner's distances (L2 of normalised rows, cosine) in
  every combination, ref_emb, reducers, smooth_loss, fp32 and half inputs, the no-triplet
  zero; the miner distances it leaves to other engines;
- TripletMarginMiner (all, hard, semihard, easy; margins 0.2 and 0): the "all"-triplets
  kernels with the miner's window, over the shared cases and both distances, odd shapes,
  ref_emb, the reducers the totals serve and one that takes the tuple, the kept counts.

Without a GPU these run under TRITON_INTERPRET=1 on CPU tensors."""
import pytest
import torch
from pytorch_metric_learning import distances as pd
from pytorch_metric_learning import losses as pl
from pytorch_metric_learning import miners as pm
from pytorch_metric_learning import reducers as pr

import metrix_ops as mo
from cases import CASE_IDS, CASES, assert_close_vg, make_case
from metrix_ops import fused
from triton_cases import compiles_only, on_dev, requires_triton, run_sm90_script

pytestmark = requires_triton

KEY = ("triton", "TripletMarginLoss")


def dists(name):
    """(ours, PML's) distance kwargs of a distance name."""
    if name == "l2":
        return {}, {}
    if name == "l2sq":  # FaceNet's squared L2
        return {"distance": mo.distances.LpDistance(power=2)}, {"distance": pd.LpDistance(power=2)}
    return {"distance": mo.distances.CosineSimilarity()}, {"distance": pd.CosineSimilarity()}


def build(loss_dist="l2", miner_dist="l2", reducer=None, **kw):
    (lo, lp), (mo_, mp) = dists(loss_dist), dists(miner_dist)
    red = {} if reducer is None else {"reducer": getattr(mo.reducers, reducer)()}
    pred = {} if reducer is None else {"reducer": getattr(pr, reducer)()}
    ours = mo.losses.TripletMarginLoss(backend="triton", miner=mo.miners.BatchHardMiner(**mo_),
                                       **lo, **red, **kw)
    loss, miner = pl.TripletMarginLoss(**lp, **pred, **kw), pm.BatchHardMiner(**mp)
    return ours, (lambda e, y, *ref: loss(e, y, miner(e, y, *ref), *ref))


@pytest.fixture
def calls(monkeypatch):
    out = []
    supports, impl = fused.MINER_IMPLS[KEY]
    monkeypatch.setitem(fused.MINER_IMPLS, KEY, (supports, lambda *a: out.append(1) or impl(*a)))
    return out


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("loss_dist,miner_dist", [("l2", "l2"), ("cos", "cos"), ("cos", "l2"),
                                                  ("l2", "cos"), ("l2sq", "l2"), ("l2sq", "cos")])
def test_matches_pml(case, loss_dist, miner_dist, calls):
    x, y = on_dev(*make_case(case))
    ours, theirs = build(loss_dist, miner_dist, margin=0.3)
    assert_close_vg(lambda e: ours(e, y), lambda e: theirs(e, y), x)
    assert calls


@pytest.mark.parametrize("reducer", ["MeanReducer", "SumReducer", "AvgNonZeroReducer"])
def test_reducers_and_smooth_loss(reducer):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(50, 9, dtype=torch.float64, generator=g)
    y = torch.randint(0, 6, (50,), generator=g)
    x, y = on_dev(x, y)
    for smooth in (False, True):
        ours, theirs = build(reducer=reducer, smooth_loss=smooth)
        assert_close_vg(lambda e: ours(e, y), lambda e: theirs(e, y), x)


@pytest.mark.parametrize("same_labels", [False, True])
def test_ref_emb(same_labels, calls):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(19, 7, dtype=torch.float64, generator=g)
    y = torch.randint(0, 4, (19,), generator=g)
    if same_labels:  # PML drops the self pairs by index: ref the same length
        r, ry = torch.randn(19, 7, dtype=torch.float64, generator=g), y
    else:
        r = torch.randn(30, 7, dtype=torch.float64, generator=g)
        ry = torch.randint(0, 4, (30,), generator=g)
    x, r, y, ry = on_dev(x, r, y, ry)
    ry = y if same_labels else ry
    ours, theirs = build("cos", "l2")
    assert_close_vg(lambda e, f: ours(e, y, ref_emb=f, ref_labels=ry),
                    lambda e, f: theirs(e, y, f, ry), x, r)
    assert calls


def test_fp32_and_half_inputs():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(45, 20, generator=g)
    y = torch.randint(0, 6, (45,), generator=g)
    x, y = on_dev(x, y)
    ours, theirs = build(margin=0.2)
    assert_close_vg(lambda e: ours(e, y), lambda e: theirs(e, y), x, rtol=1e-4, atol=1e-6)
    h = x.detach().half().requires_grad_()
    v = ours(h, y)
    v.backward()
    assert v.dtype == torch.float32 and torch.isfinite(h.grad).all()
    torch.testing.assert_close(v, theirs(h.detach().float(), y), rtol=2e-3, atol=1e-3)


def test_no_triplet_gives_zero_with_graph():
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    (x,) = on_dev(x)
    y = on_dev(torch.arange(5))[0]  # no positives: no triplet
    ours, _ = build()
    v = ours(x, y)
    v.backward()
    assert float(v.detach()) == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


def test_other_miner_distances_are_not_covered(calls):
    """A miner on the L1 distance orders pairs by no product: not this path (an explicit
    backend says so; "auto" takes another engine). The L2 of raw rows is covered
    (test_triton_raw_l2.py)."""
    x, y = on_dev(*make_case(CASES[1]))
    miner = mo.miners.BatchHardMiner(distance=mo.distances.LpDistance(p=1))
    with pytest.raises(NotImplementedError, match="does not cover"):
        mo.losses.TripletMarginLoss(backend="triton", miner=miner)(x, y)
    assert not calls


# ---- TripletMarginMiner: the "all"-triplets kernels with the miner's window

TYPES = ("all", "hard", "semihard", "easy")


def build_tm(kind, mine_margin, dist="l2", reducer=None, margin=0.1):
    (lo, lp), _ = dists(dist), None
    red = {} if reducer is None else {"reducer": getattr(mo.reducers, reducer)()}
    pred = {} if reducer is None else {"reducer": getattr(pr, reducer)()}
    ours = mo.losses.TripletMarginLoss(
        backend="triton", miner=mo.miners.TripletMarginMiner(mine_margin, kind, **lo),
        margin=margin, **lo, **red)
    loss = pl.TripletMarginLoss(margin=margin, **lp, **pred)
    miner = pm.TripletMarginMiner(mine_margin, kind, **lp)
    return ours, (lambda e, y, *ref: loss(e, y, miner(e, y, *ref), *ref))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("dist", ["l2", "cos"])
def test_triplet_miner_matches_pml(case, kind, dist, calls):
    x, y = on_dev(*make_case(case))
    for mine_margin in (0.2, 0.0):
        ours, theirs = build_tm(kind, mine_margin, dist)
        assert_close_vg(lambda e: ours(e, y), lambda e: theirs(e, y), x)
    assert calls


@pytest.mark.parametrize("kind", TYPES)
def test_triplet_miner_odd_shapes_and_ref_emb(kind, calls):
    g = torch.Generator().manual_seed(len(kind))
    x = torch.randn(45, 11, dtype=torch.float64, generator=g)
    y = torch.randint(0, 5, (45,), generator=g)
    r = torch.randn(38, 11, dtype=torch.float64, generator=g)
    ry = torch.randint(0, 5, (38,), generator=g)
    x, y, r, ry = on_dev(x, y, r, ry)
    ours, theirs = build_tm(kind, 0.3, "cos", margin=0.2)
    assert_close_vg(lambda e: ours(e, y), lambda e: theirs(e, y), x)
    assert_close_vg(lambda e, f: ours(e, y, ref_emb=f, ref_labels=ry),
                    lambda e, f: theirs(e, y, f, ry), x, r)
    assert calls


@pytest.mark.parametrize("reducer", ["MeanReducer", "SumReducer", "AvgNonZeroReducer"])
@pytest.mark.parametrize("dist", ["l2", "l2sq"])
def test_triplet_miner_reducers(reducer, dist):
    """Mean counts every kept triplet, zero terms too: squared L2's window (the miner's margin
    halved with the loss's) must keep PML's triplets"""
    x, y = on_dev(*make_case(CASES[1]))
    for kind in ("semihard", "easy"):
        ours, theirs = build_tm(kind, 0.4, dist, reducer=reducer)
        assert_close_vg(lambda e: ours(e, y), lambda e: theirs(e, y), x)


def test_triplet_miner_kept_counts_are_the_miners():
    """The op's per-anchor triplet counts are the triplets PML's miner returns, and its
    active counts those among them with loss > 0."""
    import torch.nn.functional as F
    from metrix_ops.triton.triplet_margin import triplet_mined_rows_triton
    g = torch.Generator().manual_seed(9)
    x = F.normalize(torch.randn(30, 5, dtype=torch.float64, generator=g), dim=1)
    y = torch.randint(0, 4, (30,), generator=g)
    x, y = on_dev(x, y)
    for kind in TYPES:
        _, nz, trip = triplet_mined_rows_triton(x, x, y, y, True, False, 0.1, kind, 0.25)
        a, p, n = pm.TripletMarginMiner(0.25, kind)(x, y)
        assert torch.equal(trip, torch.bincount(a, minlength=30)), kind
        d = torch.cdist(x, x)
        active = (d[a, p] - d[a, n]) + 0.1 > 0
        assert torch.equal(nz, torch.bincount(a[active], minlength=30)), kind


_SM90 = r'''
import metrix_ops.triton.triplet_margin as tm

failed = []
ptrs = {"crank_ptr": "*i64", "srank_ptr": "*i64", "npos_ptr": "*i64", "nz_ptr": "*i64",
        "trip_ptr": "*i64", "cnt_ptr": "*i32"}
for fdt, acc, prec, rows, width in [("fp32", tl.float32, "tf32", 32, 512),
                                    ("fp64", tl.float64, "ieee", 16, 128)]:
    tiles = dict(BLOCK_M=rows, BLOCK_N=rows, BLOCK_D=64, ACC=acc, PRECISION=prec,
                 EXCLUDE_DIAG=True, BLOCK_P=16, BLOCK_DO=width)
    # every triplet; TripletMarginMiner "semihard"; the L2 of raw rows (threshold, radial
    # part); their squared L2 (the cosine keys read as 1 − d²/2, COSINE and RAW)
    for mine, raw, cos in ((0, False, False), (3, False, False), (0, True, False),
                           (3, True, False), (0, True, True), (3, True, True)):
        for fn in (tm._tri_pos_keys_kernel, tm._tri_fwd_kernel, tm._tri_pos_counts_kernel,
                   tm._tri_grad_dx_kernel, tm._tri_grad_dr_kernel):
            consts = {k: v for k, v in dict(tiles, MINE=mine, RAW=raw, COSINE=cos).items()
                      if k in fn.arg_names}
            try:
                compile_sm90(fn, consts, fdt, num_warps=4 if width <= 128 else 8,
                             pointer_types=ptrs)
            except Exception as e:  # noqa: BLE001
                failed.append(f"{fn.__name__} {fdt} MINE={mine} RAW={raw} COSINE={cos}: "
                              f"{type(e).__name__}: {str(e)[:300]}")
print("\n".join(failed))
sys.exit(1 if failed else 0)
'''


@compiles_only
def test_triplet_kernels_compile_for_h100():
    """The "all"-triplets kernels, with and without the miner's window, for unit and raw
    rows (L2 and squared), compile for sm_90."""
    run_sm90_script(_SM90)
