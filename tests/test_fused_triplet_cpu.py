"""The fused CPU all-triplets margin op against PML and the reference: values and gradients
over the shared cases, margins, both distances, reducers, references, ties, chunking,
dtypes; fallbacks; opcheck and torch.compile."""
import pytest
import torch
import torch.nn.functional as F

import metrix_ops as mo
from cases import CASE_IDS, CASES, assert_close_vg, make_case, pml_pair
from metrix_ops import _ext

pytestmark = pytest.mark.skipif(not _ext.HAS_EXT, reason="extension not built")

MARGINS = [0.0, 0.05, 0.5, 5.0]
# squared L2 (FaceNet's) runs on the cosine ops at half the margin, doubled (fused/triplet_margin)
DISTS = {"l2": None, "cos": mo.distances.CosineSimilarity,
         "l2sq": lambda: mo.distances.LpDistance(power=2)}
ALL_DISTS = list(DISTS)


def pml_dist(dist):
    from pytorch_metric_learning import distances as pd
    return {"l2": None, "cos": pd.CosineSimilarity, "l2sq": lambda: pd.LpDistance(power=2)}[dist]


def pair(dist="l2", **kw):
    d = DISTS[dist]
    mk = (lambda: {}) if d is None else (lambda: {"distance": d()})
    return (mo.losses.TripletMarginLoss(backend="cpu", **mk(), **kw),
            mo.losses.TripletMarginLoss(backend="reference", **mk(), **kw))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("margin", MARGINS)
@pytest.mark.parametrize("dist", ALL_DISTS)
def test_matches_reference_fp64(case, margin, dist):
    x, y = make_case(case)
    fused, ref = pair(dist, margin=margin)
    assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("reducer", ["AvgNonZeroReducer", "MeanReducer", "SumReducer"])
@pytest.mark.parametrize("dist", ALL_DISTS)
def test_matches_pml_fp64(case, reducer, dist):
    x, y = make_case(case, seed=3)
    _, pml = pml_pair("TripletMarginLoss", {"margin": 0.1}, pml_dist(dist), reducer)
    fused, _ = pair(dist, margin=0.1, reducer=getattr(mo.reducers, reducer)())
    assert_close_vg(lambda e: fused(e, y), lambda e: pml(e, y), x)


@pytest.mark.parametrize("seed", range(4))
def test_random_odd_shapes_fp64_and_fp32(seed):
    g = torch.Generator().manual_seed(100 + seed)
    b, m, d = [int(v) for v in torch.randint(2, 70, (3,), generator=g)]
    k = int(torch.randint(2, 9, (1,), generator=g))
    x = torch.randn(b, d, dtype=torch.float64, generator=g)
    r = torch.randn(m, d, dtype=torch.float64, generator=g)
    y, ry = torch.randint(0, k, (b,), generator=g), torch.randint(0, k, (m,), generator=g)
    for dist in ALL_DISTS:
        for margin in (0.05, 0.3):
            fused, ref = pair(dist, margin=margin)
            assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x)
            assert_close_vg(lambda e, f: fused(e, y, ref_emb=f, ref_labels=ry),
                            lambda e, f: ref(e, y, ref_emb=f, ref_labels=ry), x, r)
            assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x.float(),
                            rtol=1e-4, atol=1e-6)


def test_ref_emb_with_batch_labels_excludes_diagonal():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(17, 6, dtype=torch.float64, generator=g)
    r = torch.randn(17, 6, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (17,), generator=g)
    for red in (None, mo.reducers.MeanReducer(), mo.reducers.SumReducer()):
        fused, ref = pair(reducer=red)
        assert_close_vg(lambda e, f: fused(e, y, ref_emb=f, ref_labels=y),
                        lambda e, f: ref(e, y, ref_emb=f, ref_labels=y), x, r)


def _check_vs_reference_and_pml(x, y, margin, dist):
    fused, ref = pair(dist, margin=margin)
    assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x)
    _, pml = pml_pair("TripletMarginLoss", {"margin": margin}, pml_dist(dist))
    assert_close_vg(lambda e: fused(e, y), lambda e: pml(e, y), x)


# Exact ties on the hinge follow PML's roundings of cdist's values, which the L2 op takes
# as they are; squared L2 is PML's fl(cdist)², off the exact d² (√3² = 2.9999999999999996),
# so which tied triplets PML counts as > 0 is its rounding's, not 2 − 2s's: those grids are
# for the distances computed as PML does (squared L2 meets PML on the random cases above).
EXACT_DISTS = ["l2", "cos"]


@pytest.mark.parametrize("margin", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("dist", EXACT_DISTS)
def test_exact_grid_ties_on_the_hinge(margin, dist):
    # rows in {±1/2}^4 are unit with exact dot products, so every distance is exactly
    # representable (d ∈ {0, 1, √2, √3, 2}) in PML's cdist and here alike: whole groups of
    # triplets sit exactly on the hinge (loss 0), and AvgNonZero must leave them out as PML
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, 2, (40, 4), generator=g).double() - 0.5
    y = torch.randint(0, 4, (40,), generator=g)
    _check_vs_reference_and_pml(x, y, margin, dist)


@pytest.mark.parametrize("margin", [0.0, 0.05, 0.25])
@pytest.mark.parametrize("dist", EXACT_DISTS)
def test_quantised_embeddings_many_ties(margin, dist):
    # entries in {-1, 0, 1}: many repeated rows and equal distances. With margin 0 many
    # triplets are mathematically on the hinge and their sign is decided by rounding, so
    # this passes only because the op uses PML's own distance values (cdist)
    g = torch.Generator().manual_seed(11)
    x = torch.randint(-1, 2, (40, 3), generator=g).double()
    x[x.abs().sum(1) == 0, 0] = 1.0
    y = torch.randint(0, 4, (40,), generator=g)
    _check_vs_reference_and_pml(x, y, margin, dist)


@pytest.mark.parametrize("margin", [0.0, 0.25])
@pytest.mark.parametrize("dist", EXACT_DISTS)
def test_many_positives_sorted_path_and_few_dense_path(margin, dist):
    """Rows with more than 64 positives take the sorted-positives path (a binary search per
    negative), rows with fewer every (p, n) in SIMD lanes: one batch with a class of 70 and
    small classes runs both, on the exact grid of test_exact_grid_ties_on_the_hinge (whole
    groups of triplets on the hinge) and on random rows, against the reference and PML."""
    g = torch.Generator().manual_seed(21)
    y = torch.cat([torch.zeros(70, dtype=torch.long), torch.randint(1, 6, (31,), generator=g)])
    grid = torch.randint(0, 2, (101, 4), generator=g).double() - 0.5
    _check_vs_reference_and_pml(grid, y, margin, dist)
    _check_vs_reference_and_pml(torch.randn(101, 6, dtype=torch.float64, generator=g), y,
                                margin, dist)


def test_duplicates_give_finite_gradients():
    x = torch.randn(3, 5, dtype=torch.float64).repeat(4, 1)  # every row four times
    y = torch.tensor([0, 1, 2] * 4)
    for dist in ("l2", "cos"):
        fused, ref = pair(dist, margin=0.2)
        xg = x.clone().requires_grad_()
        fused(xg, y).backward()
        assert torch.isfinite(xg.grad).all()
        assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x)


def test_empty_and_degenerate_batches():
    fused, ref = pair()
    for b in (1, 2):
        x = torch.randn(b, 4, dtype=torch.float64)
        y = torch.zeros(b, dtype=torch.long)
        assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x)
    x = torch.randn(0, 4, dtype=torch.float64, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long)
    try:
        want = ref(x, y)
    except Exception as e:  # the input validation refuses it for both backends alike
        with pytest.raises(type(e)):
            fused(x, y)
    else:
        torch.testing.assert_close(fused(x, y), want)


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_chunk_boundaries(chunk):
    from metrix_ops.ops.triplet import triplet_all_rows
    g = torch.Generator().manual_seed(chunk)
    x = F.normalize(torch.randn(23, 6, dtype=torch.float64, generator=g), dim=1)
    y = torch.randint(0, 4, (23,), generator=g)
    w = torch.rand(23, dtype=torch.float64, generator=g)  # unequal row weights

    def rows(e, c):
        out, nz, tr = triplet_all_rows(e, e, y, y, True, False, 0.2, c)
        return (out * w).sum(), nz, tr

    va, na, ta = rows(x, chunk)
    vb, nb, tb = rows(x, 1000)
    assert torch.equal(na, nb) and torch.equal(ta, tb)
    assert_close_vg(lambda e: rows(e, chunk)[0], lambda e: rows(e, 1000)[0], x)
    # the per-anchor counts themselves, from the explicit triplets
    d = torch.cdist(x, x)
    same = y[:, None] == y[None, :]
    pos = same & ~torch.eye(23, dtype=torch.bool)
    viol = (d[:, :, None] - d[:, None, :]) + 0.2  # [a, p, n]
    mask = pos[:, :, None] & ~same[:, None, :]
    assert torch.equal(ta, mask.sum((1, 2)))
    assert torch.equal(na, (mask & (viol > 0)).sum((1, 2)))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 2e-3),
                                       (torch.bfloat16, 1e-2)])
def test_low_precision(dtype, tol):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 16, generator=g).to(dtype)
    y = torch.randint(0, 6, (40,), generator=g)
    fused, ref = pair()
    want = ref(x.double(), y)
    xg = x.clone().requires_grad_()
    out = fused(xg, y)
    out.backward()
    assert out.dtype == torch.float32 and xg.grad.dtype == dtype
    assert torch.isfinite(xg.grad.float()).all()
    assert abs(float(out.detach()) - float(want)) <= tol * abs(float(want))
    # the op itself takes half inputs and computes them in fp32
    from metrix_ops.ops.triplet import triplet_all_rows
    xu = F.normalize(x.float(), dim=1).to(dtype)
    rows, _, _ = triplet_all_rows(xu, xu, y, y, True, False, 0.05)
    assert rows.dtype == torch.float32


def test_falls_back_or_refuses_outside_its_scope():
    x, y = make_case(CASES[1])
    ref = mo.losses.TripletMarginLoss(backend="reference", margin=0.2)
    auto = mo.losses.TripletMarginLoss(backend="auto", margin=0.2)
    it = mo.miners.BatchHardMiner()(x, y) if hasattr(mo.miners, "BatchHardMiner") else None
    if it is not None:
        torch.testing.assert_close(auto(x, y, it), ref(x, y, it))
        torch.testing.assert_close(mo.losses.TripletMarginLoss(backend="cpu", margin=0.2)(x, y, it),
                                   ref(x, y, it))  # an indices_tuple: fused/indices/
    for kw in ({"swap": True}, {"smooth_loss": True}, {"triplets_per_anchor": 3}):
        with pytest.raises(NotImplementedError, match="does not cover"):
            mo.losses.TripletMarginLoss(backend="cpu", **kw)(x, y)
    with pytest.raises(NotImplementedError, match="does not cover"):
        mo.losses.TripletMarginLoss(
            backend="cpu", distance=mo.distances.LpDistance(p=1))(x, y)
    # a reducer that needs the per-triplet terms: the reference runs inside the cpu backend
    red = mo.reducers.ThresholdReducer(low=0.05, high=0.3)
    fused, ref = pair(margin=0.2, reducer=red)
    assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x)
    # zero-low ThresholdReducer is AvgNonZero, served by the op
    fused, ref = pair(margin=0.2, reducer=mo.reducers.ThresholdReducer(low=0))
    assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x)


def test_op_input_checks_name_the_argument():
    x = F.normalize(torch.randn(5, 3), dim=1)
    y = torch.zeros(5, dtype=torch.long)
    op = torch.ops.metrix_ops.triplet_all_fwd
    with pytest.raises(RuntimeError, match="ref_labels"):
        op(x, x, y, y[:4], True, False, 0.1, 4)
    with pytest.raises(RuntimeError, match="labels"):
        op(x, x, y.int(), y, True, False, 0.1, 4)
    with pytest.raises(RuntimeError, match="chunk"):
        op(x, x, y, y, True, False, 0.1, 0)
    with pytest.raises(RuntimeError, match="exclude_diag"):
        op(x, x[:4], y, y[:4], True, False, 0.1, 4)
    with pytest.raises(RuntimeError, match="margin"):
        op(x, x, y, y, True, False, float("nan"), 4)


def test_opcheck_and_compile():
    from metrix_ops.ops.triplet import triplet_all_rows
    x = F.normalize(torch.randn(9, 5), dim=1).requires_grad_()
    r = F.normalize(torch.randn(9, 5), dim=1).requires_grad_()
    y = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3, 3])
    for cosine in (False, True):
        torch.library.opcheck(torch.ops.metrix_ops.triplet_all_fwd.default,
                              (x, r, y, y, True, cosine, 0.3, 4))
        torch.library.opcheck(torch.ops.metrix_ops.triplet_all_fwd.default,
                              (x, r, y, y.flip(0), False, cosine, 0.3, 4))
    # rows of any norm, their squared L2 through the cosine keys (raw_sq: 1 − d²/2 of
    # cdist's d, past and below cdist's 25-row switch), and its argument check
    xr, rr = (3 * x).detach().requires_grad_(), (2 * r).detach().requires_grad_()
    torch.library.opcheck(torch.ops.metrix_ops.triplet_all_fwd.default,
                          (xr, rr, y, y.flip(0), False, True, 0.3, 4, True))
    x30 = (3 * torch.randn(30, 5, dtype=torch.float64)).requires_grad_()
    y30 = torch.arange(30) % 4
    torch.library.opcheck(torch.ops.metrix_ops.triplet_all_fwd.default,
                          (x30, x30, y30, y30, True, True, 0.3, 7, True))
    with pytest.raises(RuntimeError, match="raw_sq=True .* needs cosine=True"):
        torch.ops.metrix_ops.triplet_all_fwd(xr, rr, y, y, False, False, 0.3, 4, True)

    def f(e):
        rows, nz, _ = triplet_all_rows(e, e, y, y, True, False, 0.3, 4)
        return rows.sum() / nz.sum().clamp_min(1)

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), f(x))
    ga = torch.autograd.grad(compiled(x), x)[0]
    gb = torch.autograd.grad(f(x), x)[0]
    torch.testing.assert_close(ga, gb)
