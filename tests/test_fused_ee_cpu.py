"""Fused CPU Embedding Expansion for MultiSimilarityLoss, LiftedStructureLoss, NPairsLoss,
GeneralizedLiftedStructureLoss (ee_neg_lse) and TripletMarginLoss (ee_triplet) against the
reference: loss and gradient on the shared cases and on class-contiguous batches
("adjacent"), n_points 0..3, both distances, normalised and not, reducers, chunking, dtypes,
SIMD levels, dispatch, errors and opcheck."""
import pytest
import torch
import torch.nn.functional as F

import metrix_ops as mo
from metrix_ops import _ext
from metrix_ops.distances import CosineSimilarity, DotProductSimilarity, LpDistance
from metrix_ops.fused import ee_losses as fused_ee
from metrix_ops.ops.ee_losses import ee_neg_lse, ee_triplet
from metrix_ops.ops.ee_mining import all_segments
from metrix_ops.reducers import AvgNonZeroReducer, MeanReducer, SumReducer, ThresholdReducer

from cases import CASES, CASE_IDS, assert_close_vg, make_case, value_and_grad
from test_fused_hphn_cpu import batch  # the random (or class-paired) batch of the EE tests

pytestmark = [pytest.mark.skipif(not _ext.HAS_EXT, reason="extension not built"),
              pytest.mark.usefixtures("one_thread")]

LOSSES = ["MultiSimilarityLoss", "LiftedStructureLoss", "NPairsLoss", "TripletMarginLoss",
          "GeneralizedLiftedStructureLoss"]
COS = {"MultiSimilarityLoss": CosineSimilarity, "LiftedStructureLoss": CosineSimilarity,
       "NPairsLoss": DotProductSimilarity, "TripletMarginLoss": CosineSimilarity,
       "GeneralizedLiftedStructureLoss": CosineSimilarity}


@pytest.fixture(params=[256, 3], ids=["chunk256", "chunk3"])
def chunk(request, monkeypatch):
    monkeypatch.setattr(fused_ee, "CHUNK", request.param)
    return request.param



def pair(name, n, pairs="all", normalize=True, dist=None, **kw):
    """(fused cpu, reference) losses of class `name` with Expansion(n, pairs, normalize)."""
    ee = mo.Expansion(n_points=n, pairs=pairs, normalize=normalize)
    out = []
    for be in ("cpu", "reference"):
        extra = dict(kw)
        if dist is not None:
            extra["distance"] = dist()
        out.append(getattr(mo.losses, name)(backend=be, expansion=ee, **extra))
    return out


def dists(name):
    return [COS[name], LpDistance]


# ---------------------------------------------------------------- loss and gradient
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_shared_cases_float64(name, case, chunk):
    x, y = make_case(case)
    for n in (0, 1, 3):
        for dist in dists(name):
            cpu, ref = pair(name, n, dist=dist)
            v = assert_close_vg(lambda e: cpu(e, y), lambda e: ref(e, y), x)
            assert torch.isfinite(v)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("n", [0, 1, 2, 3])
@pytest.mark.parametrize("pairs", ["all", "adjacent"])
@pytest.mark.parametrize("normalize", [True, False])
def test_random_batches_float64(name, n, pairs, normalize, chunk):
    for b, d, classes in ((8, 5, 2), (30, 16, 5), (41, 3, 7)):
        x, y = batch(b, d, classes, seed=b + n, contiguous=pairs == "adjacent")
        for dist in dists(name):
            if dist is LpDistance and not normalize and n > 0:
                continue  # the reference only (test_fallbacks)
            cpu, ref = pair(name, n, pairs, normalize, dist)
            v = assert_close_vg(lambda e: cpu(e, y), lambda e: ref(e, y), x)
            assert v != 0 or name in ("NPairsLoss", "TripletMarginLoss")


@pytest.mark.parametrize("name", LOSSES)
def test_n0_equals_clean_loss(name):
    x, y = batch(40, 8, 6, seed=1)
    for dist in dists(name):
        cpu, _ = pair(name, 0, dist=dist)
        clean = getattr(mo.losses, name)(backend="reference", distance=dist())
        assert_close_vg(lambda e: cpu(e, y), lambda e: clean(e, y), x)


@pytest.mark.parametrize("name", LOSSES)
def test_hyper_parameters(name):
    x, y = batch(33, 8, 5, seed=4)
    kws = {"MultiSimilarityLoss": [dict(alpha=0.5, beta=10.0, base=0.1),
                                   dict(alpha=5.0, beta=80.0, base=0.9)],
           "LiftedStructureLoss": [dict(neg_margin=0.3, pos_margin=0.2),
                                   dict(neg_margin=2.0, pos_margin=0.0)],
           "NPairsLoss": [{}],
           "GeneralizedLiftedStructureLoss": [dict(neg_margin=0.3, pos_margin=0.2),
                                              dict(neg_margin=2.5, pos_margin=0.0)],
           "TripletMarginLoss": [dict(margin=0.3), dict(margin=1e-4), dict(smooth_loss=True),
                                 dict(margin=25.0, smooth_loss=True)]}[name]
    for kw in kws:
        for dist in dists(name):
            cpu, ref = pair(name, 2, dist=dist, **kw)
            assert_close_vg(lambda e: cpu(e, y), lambda e: ref(e, y), x)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("reducer", [MeanReducer, SumReducer, AvgNonZeroReducer,
                                     lambda: ThresholdReducer(low=0.05, high=3.0)],
                         ids=["mean", "sum", "avgnonzero", "threshold"])
def test_reducers(name, reducer):
    x, y = batch(30, 8, 4, seed=6)
    cpu, ref = pair(name, 2, reducer=reducer())
    assert_close_vg(lambda e: cpu(e, y), lambda e: ref(e, y), x)


@pytest.mark.parametrize("name", LOSSES)
def test_float32(name):
    x, y = batch(130, 33, 12, seed=7, dtype=torch.float32)
    for dist in dists(name):
        for n in (0, 2):
            cpu, ref = pair(name, n, dist=dist)
            assert_close_vg(lambda e: cpu(e, y), lambda e: ref(e, y), x, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input(name, dtype):
    x, y = batch(33, 16, 4, seed=2, dtype=dtype)
    cpu, ref = pair(name, 2)
    out = cpu(x, y)
    assert out.dtype == torch.float32
    va, (ga,) = value_and_grad(lambda e: cpu(e, y), x)
    vb, (gb,) = value_and_grad(lambda e: ref(e, y), x)
    torch.testing.assert_close(va, vb, rtol=1e-4, atol=1e-5)  # both fp32
    # the gradients come back in the input's dtype: two fp32 gradients a rounding apart can
    # round to neighbouring half values (bf16: 1 ulp = 2^-8 relative)
    assert ga.dtype == dtype
    torch.testing.assert_close(ga, gb, rtol=2 * torch.finfo(dtype).eps, atol=1e-5)


@pytest.mark.parametrize("name", LOSSES)
def test_duplicates_and_antipodes(name, chunk):
    x, y = batch(24, 4, 3, seed=5)
    x[1], y[1] = x[0], y[0]  # a duplicate positive: its segment's points coincide with x_0
    x[5], y[5] = x[3], (y[3] + 1) % 3  # a duplicate negative
    x[7], y[7] = -x[8], y[8]  # an antipodal segment: points at λ = 1/3, 2/3 have norm 1/3
    for n in (1, 2):
        for dist in dists(name):
            cpu, ref = pair(name, n, dist=dist)
            if n == 2:
                v = assert_close_vg(lambda e: cpu(e, y), lambda e: ref(e, y), x)
                assert torch.isfinite(v)
                continue
            # n = 1: the antipodal midpoint has norm ~1e-8 from rounding alone, so its cosines
            # are rounding noise over 1e-8: values agree, gradients (noise × 1e8) are not
            # comparable, only finite
            xx = x.clone().requires_grad_()
            v = cpu(xx, y)
            torch.testing.assert_close(v, ref(x, y), rtol=1e-6, atol=1e-9)
            v.backward()
            assert torch.isfinite(xx.grad).all()


# ---------------------------------------------------------------- the op itself
def test_op_matches_reference_negative_scores():
    """The op's per-anchor log-sum-exp equals the reference's over its ŝ matrix."""
    from metrix_ops.reference.expansion_mining import ExpandedBatch
    from metrix_ops.spec import LossInputs
    x, y = batch(37, 6, 5, seed=3)
    for dist, l2 in ((CosineSimilarity(), False), (LpDistance(), True)):
        eb = ExpandedBatch(LossInputs(x, y, None, x, y, True, dist), mo.Expansion(n_points=3))
        want = torch.logsumexp((2.0 * eb.negative_scores() - 0.5).masked_fill(
            ~eb.neg, float("-inf")), 1)
        si, sj = all_segments(y)
        for c in (256, 1, 7):
            got = ee_neg_lse(F.normalize(x, dim=1), y, si, sj, 3, l2, 2.0, -0.5, chunk=c)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_masks_and_no_terms():
    x, y = batch(12, 5, 3, seed=2)
    xu = F.normalize(x, dim=1)
    si, sj = all_segments(y)
    full = ee_neg_lse(xu, y, si, sj, 2, False, 1.0, 0.0)
    amask = torch.arange(12) % 2 == 0
    part = ee_neg_lse(xu, y, si, sj, 2, False, 1.0, 0.0, anchor_mask=amask)
    assert torch.equal(part[amask], full[amask]) and torch.isinf(part[~amask]).all()
    one = torch.zeros(6, dtype=torch.long)  # one class: no negative at all
    assert torch.isinf(ee_neg_lse(xu[:6], one, *all_segments(one), 2, False, 1.0, 0.0)).all()


def test_op_errors():
    x = F.normalize(torch.randn(6, 4, dtype=torch.float64), dim=1)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    si, sj = torch.tensor([0, 2]), torch.tensor([1, 3])
    m = torch.ones(6, dtype=torch.bool)
    op = torch.ops.metrix_ops.ee_neg_lse_fwd
    for n in (2, 0):  # n = 0 too: segments are checked even where no point is placed on them
        with pytest.raises(RuntimeError, match="different labels"):
            op(x, y, torch.tensor([0]), torch.tensor([2]), m, m, n, False, 1.0, 0.0, 4)
    with pytest.raises(RuntimeError, match="distinct rows"):
        op(x, y, torch.tensor([0]), torch.tensor([9]), m, m, 2, False, 1.0, 0.0, 4)
    with pytest.raises(RuntimeError, match="chunk"):
        op(x, y, si, sj, m, m, 2, False, 1.0, 0.0, 0)
    with pytest.raises(RuntimeError, match="n_points"):
        op(x, y, si, sj, m, m, -1, False, 1.0, 0.0, 4)
    with pytest.raises(RuntimeError, match="anchor_mask"):
        op(x, y, si, sj, m[:5], m, 2, False, 1.0, 0.0, 4)
    with pytest.raises(RuntimeError, match="neg_mask"):
        op(x, y, si, sj, m, m.long(), 2, False, 1.0, 0.0, 4)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        op(x.half(), y, si, sj, m, m, 2, False, 1.0, 0.0, 4)
    with pytest.raises(RuntimeError, match="grad"):
        torch.ops.metrix_ops.ee_neg_lse_bwd(x[:, 0][:5], x[:, 0], x, y, si, sj, m, m, 2, False,
                                            1.0, 0.0, 4)


def test_opcheck():
    x, y = batch(17, 8, 4, seed=3)
    si, sj = all_segments(y)
    m = torch.ones(17, dtype=torch.bool)
    for dt in (torch.float64, torch.float32):
        xu = F.normalize(x, dim=1).to(dt).requires_grad_()
        for l2 in (False, True):
            torch.library.opcheck(torch.ops.metrix_ops.ee_neg_lse_fwd.default,
                                  (xu, y, si, sj, m, m, 3, l2, 1.5, -0.2, 5))
        g = torch.rand(17, dtype=dt)
        lse = torch.ops.metrix_ops.ee_neg_lse_fwd(xu.detach(), y, si, sj, m, m, 3, False, 1.5,
                                                  -0.2, 5)
        torch.library.opcheck(torch.ops.metrix_ops.ee_neg_lse_bwd.default,
                              (g, lse, xu.detach(), y, si, sj, m, m, 3, False, 1.5, -0.2, 5))


def test_opcheck_triplet():
    x, y = batch(17, 8, 4, seed=3)
    si, sj = all_segments(y)
    pa, pp = fused_ee._positive_pairs(y)
    for dt in (torch.float64, torch.float32):
        xu = F.normalize(x, dim=1).to(dt)
        pos = (xu[pa] - xu[pp]).norm(dim=1).requires_grad_()
        for l2, smooth in ((True, False), (False, True)):
            torch.library.opcheck(torch.ops.metrix_ops.ee_triplet_fwd.default,
                                  (xu.requires_grad_(), y, si, sj, pos, 3, l2, 0.3, smooth, 5))
        g = torch.rand(17, dtype=dt)
        torch.library.opcheck(torch.ops.metrix_ops.ee_triplet_bwd.default,
                              (g, xu.detach(), y, si, sj, pos.detach(), 3, True, 0.3, False, 5))


def test_gradcheck_op():
    x, y = batch(9, 4, 3, seed=8)
    si, sj = all_segments(y)
    xu = F.normalize(x, dim=1).requires_grad_()
    for l2 in (False, True):
        assert torch.autograd.gradcheck(
            lambda e: ee_neg_lse(e, y, si, sj, 2, l2, 3.0, -1.0, chunk=2), (xu,))
    pa, pp = fused_ee._positive_pairs(y)
    pos = (xu[pa] - xu[pp]).norm(dim=1).detach().requires_grad_()
    for l2 in (False, True):  # smooth: relu's kinks are not differentiable
        assert torch.autograd.gradcheck(
            lambda e, q: ee_triplet(e, y, si, sj, q, 2, l2, 0.3, True, 2)[0], (xu, pos))


# ---------------------------------------------------------------- dispatch
@pytest.mark.parametrize("name", LOSSES)
def test_auto_picks_cpu(name, monkeypatch):
    called = []
    sup, impl = mo.fused.EXPANSION_IMPLS[("cpu", name)]
    monkeypatch.setitem(mo.fused.EXPANSION_IMPLS, ("cpu", name),
                        (sup, lambda *a, **k: called.append(1) or impl(*a, **k)))
    x, y = batch(20, 8, 3, seed=1, contiguous=True)
    for ee in (mo.Expansion(n_points=0), mo.Expansion(n_points=3),
               mo.Expansion(n_points=2, pairs="adjacent")):
        getattr(mo.losses, name)(backend="auto", expansion=ee)(x, y)
    assert len(called) == 3
    # unnormalised points with L2, a non-normalising distance, ref_emb: the reference
    getattr(mo.losses, name)(distance=LpDistance(), expansion=mo.Expansion(
        n_points=2, normalize=False))(x, y)
    assert len(called) == 3
    with pytest.raises(NotImplementedError):
        getattr(mo.losses, name)(backend="cpu", distance=LpDistance(), expansion=mo.Expansion(
            n_points=2, normalize=False))(x, y)


def test_explicit_cpu_covers_losses():
    """Every EE loss runs on backend="cpu"; TripletMarginLoss with swap or a
    triplets_per_anchor count (which the reference does not implement with EE) still raises."""
    x, y = batch(20, 8, 3, seed=1)
    ee = mo.Expansion(n_points=2)
    for name in LOSSES + ["HPHNTripletLoss"]:
        getattr(mo.losses, name)(backend="cpu", expansion=ee)(x, y)
    for kw in (dict(swap=True), dict(triplets_per_anchor=3)):
        with pytest.raises(NotImplementedError):
            mo.losses.TripletMarginLoss(backend="cpu", expansion=ee, **kw)(x, y)


def test_triplet_totals_equal_reference_terms():
    """The op's per-anchor totals equal the reference's triplet terms summed per anchor."""
    from metrix_ops.reference.expansion import expansion_loss_dict
    from metrix_ops.spec import LossInputs
    x, y = batch(29, 6, 4, seed=9)
    xu = F.normalize(x, dim=1)
    for dist, smooth in ((LpDistance(), False), (CosineSimilarity(), True)):
        inp = LossInputs(x, y, None, x, y, True, dist)
        terms = expansion_loss_dict("TripletMarginLoss", dict(margin=0.2, smooth_loss=smooth),
                                    inp, mo.Expansion(n_points=2))["loss"]
        a = terms["indices"][0]
        want = torch.zeros(29, dtype=x.dtype).index_add(0, a, terms["losses"])
        want_nz = torch.zeros(29, dtype=torch.long).index_add(0, a, (terms["losses"] > 0).long())
        pa, pp = fused_ee._positive_pairs(y)
        pos = fused_ee._pair_metric(inp, pa, pp)
        for c in (256, 2):
            sums, nz, cnt = ee_triplet(xu, y, *all_segments(y), pos, 2,
                                       not dist.is_inverted, 0.2, smooth, c)
            torch.testing.assert_close(sums, want, rtol=1e-10, atol=1e-12)
            assert torch.equal(nz, want_nz)
            assert torch.equal(cnt, torch.bincount(a, minlength=29))


def test_triplet_other_reducers_use_reference(monkeypatch):
    """A reducer that needs the per-triplet terms gets them from the reference, not the op."""
    x, y = batch(20, 6, 3, seed=2)
    monkeypatch.setattr(fused_ee, "ee_triplet", None)  # would raise if called
    cpu, ref = pair("TripletMarginLoss", 2, reducer=ThresholdReducer(low=0.01, high=0.2))
    assert_close_vg(lambda e: cpu(e, y), lambda e: ref(e, y), x)


def test_adjacent_needs_contiguous_pairs():
    x, _ = batch(8, 4, 3, seed=1)
    y = torch.tensor([0, 1, 1, 1, 2, 2, 0, 0])
    for name in LOSSES:
        for n in (0, 2):
            cpu, _ = pair(name, n, "adjacent")
            with pytest.raises(ValueError, match="adjacent"):
                cpu(x, y)
            with pytest.raises(ValueError, match="even batch size"):
                cpu(x[:1], y[:1])  # raised before any early zero (one row: no pair at all)


@pytest.mark.parametrize("name", LOSSES)
def test_threads_agree(name, monkeypatch):
    """Several threads (anchors, anchor classes, columns, rows per task) give the reference's
    values and gradients, and the same result twice (no races, no atomics)."""
    monkeypatch.setattr(fused_ee, "CHUNK", 16)  # several chunks of whole classes
    x, y = batch(90, 12, 9, seed=10)
    cpu, ref = pair(name, 2)
    n = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        assert_close_vg(lambda e: cpu(e, y), lambda e: ref(e, y), x)
        v1, g1 = value_and_grad(lambda e: cpu(e, y), x)
        v2, g2 = value_and_grad(lambda e: cpu(e, y), x)
        assert torch.equal(v1, v2) and torch.equal(g1[0], g2[0])
    finally:
        torch.set_num_threads(n)


# ---------------------------------------------------------------- SIMD levels (fp32)
from test_fast_exp import LEVELS, simd_level  # noqa: E402


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("level", LEVELS)
def test_simd_levels_fp32(name, level):
    """The closest-pair kernel at every x86 level: the fp32 loss and gradient equal the
    reference's, and the baseline's to the last bits of the level's exp (the terms' exps are
    the level's vectorised exp, FMA or not). The picks themselves are bit-for-bit the
    baseline's (no FMA contraction, IEEE division: every lane rounds as a scalar does), so
    ties, here from duplicate rows, fall alike: a tie broken the other way would send a
    term's gradient to another row. Odd sizes: lane tails of every width."""
    x, y = batch(37, 9, 5, seed=11, dtype=torch.float32)
    x[1], y[1] = x[0], y[0]  # a duplicate positive: its segment's points coincide with x_0
    x[5], y[5] = x[3], (y[3] + 1) % 5  # a duplicate negative
    for dist in dists(name):
        cpu, ref = pair(name, 3, dist=dist)
        with simd_level(level):
            v, g = value_and_grad(lambda e: cpu(e, y), x)
        with simd_level("baseline"):
            vb, gb = value_and_grad(lambda e: cpu(e, y), x)
        torch.testing.assert_close(v, vb, rtol=1e-6, atol=0)
        torch.testing.assert_close(g[0], gb[0], rtol=1e-5, atol=1e-7 * gb[0].abs().max().item())
        with simd_level(level):
            assert_close_vg(lambda e: cpu(e, y), lambda e: ref(e, y), x, rtol=1e-4, atol=1e-6)
