"""The fused CPU contrastive ops against the reference and PML: values and gradients over
the shared cases, margins, both distances, reducers, references, chunk and block
boundaries, dtypes; opcheck and torch.compile."""
import math

import pytest
import torch
import torch.nn.functional as F

import metrix_ops as mo
from cases import CASE_IDS, CASES, assert_close_vg, make_case, pml_pair
from metrix_ops import _ext

pytestmark = pytest.mark.skipif(not _ext.HAS_EXT, reason="extension not built")

MARGINS = [{}, {"pos_margin": 0.1, "neg_margin": 0.5}, {"pos_margin": 0.35, "neg_margin": 1.3}]


def pair(**kw):
    return (mo.losses.ContrastiveLoss(backend="cpu", **kw),
            mo.losses.ContrastiveLoss(backend="reference", **kw))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("kw", MARGINS)
def test_matches_reference_fp64(case, kw):
    x, y = make_case(case)
    fused, ref = pair(**kw)
    assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_pml(case):
    x, y = make_case(case, seed=1)
    _, pml = pml_pair("ContrastiveLoss", {"pos_margin": 0.05, "neg_margin": 0.8})
    fused = mo.losses.ContrastiveLoss(pos_margin=0.05, neg_margin=0.8, backend="cpu")
    assert_close_vg(lambda e: fused(e, y), lambda e: pml(e, y), x)


@pytest.mark.parametrize("reducer", ["AvgNonZeroReducer", "MeanReducer", "SumReducer"])
@pytest.mark.parametrize("dist", ["LpDistance", "CosineSimilarity"])
def test_reducers_and_distances_match_pml(reducer, dist):
    from pytorch_metric_learning import distances as pd
    # cosine margins: positives want s >= pos_margin, negatives s <= neg_margin
    kw = {"pos_margin": 0.7, "neg_margin": 0.2} if dist == "CosineSimilarity" else {"neg_margin": 1.1}
    _, pml = pml_pair("ContrastiveLoss", kw, dist=getattr(pd, dist), reducer=reducer)
    fused = mo.losses.ContrastiveLoss(backend="cpu", distance=getattr(pd, dist)(),
                                      reducer=getattr(mo.reducers, reducer)(), **kw)
    for case in (CASES[0], CASES[1], CASES[7]):
        x, y = make_case(case, seed=2)
        assert_close_vg(lambda e: fused(e, y), lambda e: pml(e, y), x)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("reducer", ["AvgNonZeroReducer", "MeanReducer", "SumReducer",
                                     "ThresholdReducer"])
@pytest.mark.parametrize("margins", [(0.0, 1.0), (0.1, 0.5), (0.3, 1.5)])
def test_squared_l2_matches_pml(case, reducer, margins):
    """Squared L2 of unit rows (2 − 2s) on the cosine ops at margins 1 − m/2, terms doubled
    (fused/contrastive.op_form), against PML's cdist², with references too. A window bound
    equal to a margin is avoided: a coincident pair's term is exactly that margin in PML and
    off by rounding here (2 − 2s of one row with itself is noise, not 0), so which side of
    that bound it falls on is rounding's."""
    from pytorch_metric_learning import distances as pd
    from pytorch_metric_learning import losses as pl
    from pytorch_metric_learning import reducers as pr
    pm, nm = margins
    red = (dict(low=0.2, high=1.4) if reducer == "ThresholdReducer" else {})
    kw = {"pos_margin": pm, "neg_margin": nm}
    pml = pl.ContrastiveLoss(distance=pd.LpDistance(power=2),
                             reducer=getattr(pr, reducer)(**red), **kw)
    fused = mo.losses.ContrastiveLoss(backend="cpu", distance=mo.distances.LpDistance(power=2),
                                      reducer=getattr(mo.reducers, reducer)(**red), **kw)
    x, y = make_case(case, seed=4)
    assert_close_vg(lambda e: fused(e, y), lambda e: pml(e, y), x)
    g = torch.Generator().manual_seed(9)
    r = torch.randn(11, x.shape[1], dtype=torch.float64, generator=g)
    ry = torch.randint(0, 3, (11,), generator=g)
    assert_close_vg(lambda e, q: fused(e, y, ref_emb=q, ref_labels=ry),
                    lambda e, q: pml(e, y, ref_emb=q, ref_labels=ry), x, r)
    assert_close_vg(lambda e: fused(e.float(), y).double(), lambda e: pml(e, y), x,
                    rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("low,high", [(0.1, None), (None, 0.6), (0.2, 0.9), (5.0, None)])
def test_threshold_reducer(low, high):
    x, y = make_case(CASES[1], seed=3)
    fused, ref = pair(reducer=mo.reducers.ThresholdReducer(low=low, high=high))
    assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x)


def test_ref_emb_and_ref_labels():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(15, 8, dtype=torch.float64, generator=g)
    r = torch.randn(26, 8, dtype=torch.float64, generator=g)
    y, ry = torch.randint(0, 4, (15,), generator=g), torch.randint(0, 4, (26,), generator=g)
    for kw in MARGINS[:2] + [{"distance": mo.distances.CosineSimilarity(), "pos_margin": 0.6,
                              "neg_margin": 0.1}]:
        for red in (None, mo.reducers.MeanReducer(), mo.reducers.SumReducer()):
            fused, ref = pair(reducer=red, **kw)
            assert_close_vg(lambda e, f: fused(e, y, ref_emb=f, ref_labels=ry),
                            lambda e, f: ref(e, y, ref_emb=f, ref_labels=ry), x, r)
            # ref_labels *is* labels: PML drops the diagonal pairs, as in-batch
            assert_close_vg(lambda e, f: fused(e, y, ref_emb=f, ref_labels=y),
                            lambda e, f: ref(e, y, ref_emb=f, ref_labels=y), x, r[:15])
    _, pml = pml_pair("ContrastiveLoss")
    fused = mo.losses.ContrastiveLoss(backend="cpu")
    assert_close_vg(lambda e, f: fused(e, y, ref_emb=f, ref_labels=ry),
                    lambda e, f: pml(e, y, ref_emb=f, ref_labels=ry), x, r)
    # ref_emb *is* the batch but ref_labels is another tensor: PML keeps the self pairs,
    # which only a negative pos_margin makes count ([0 − m⁺]₊ > 0)
    fused, ref = pair(pos_margin=-0.1)
    assert_close_vg(lambda e: fused(e, y, ref_emb=e, ref_labels=y.clone()),
                    lambda e: ref(e, y, ref_emb=e, ref_labels=y.clone()), x)


def _dense_rows(xu, ru, y, ry, exclude_diag, cosine, pm, nm, low, high):
    """Per-row (pos_sum, pos_cnt, neg_sum, neg_cnt) from the whole S, for the op tests."""
    s = xu @ ru.t()
    pos = y[:, None] == ry[None, :]
    valid = torch.ones_like(pos)
    if exclude_diag:
        valid.fill_diagonal_(False)
    if cosine:
        tp, tn = F.relu(pm - s), F.relu(s - nm)
    else:
        d = torch.sqrt(torch.clamp(2 - 2 * s, min=1e-30))  # no pair here has d near 0
        tp, tn = F.relu(d - pm), F.relu(nm - d)
    out = []
    for t, side in ((tp, pos & valid), (tn, ~pos & valid)):
        keep = side & (t > low) & (t < high)
        out += [(t * keep).sum(1), keep.sum(1)]
    return out


@pytest.mark.parametrize("size", [1, 3, 7, 20, 64])
@pytest.mark.parametrize("cosine", [False, True])
def test_ops_chunk_and_block_boundaries(size, cosine):
    from metrix_ops.ops.contrastive import contrastive_rows, contrastive_rows_self
    g = torch.Generator().manual_seed(size)
    b = 61  # blocks of 20 rows: two threads split them in the symmetric fold
    x = F.normalize(torch.randn(b, 6, dtype=torch.float64, generator=g), dim=1)
    y = torch.randint(0, 5, (b,), generator=g)
    w = torch.randn(4, b, dtype=torch.float64, generator=g)  # unequal row weights
    pm, nm, low, high = (0.4, 0.1, 0.02, 0.9) if cosine else (0.3, 1.2, 0.0, 1.0)

    def weighted(rows):
        assert rows[1].dtype == torch.long and rows[3].dtype == torch.long
        return (rows[0] * w[0]).sum() + (rows[2] * w[2]).sum(), rows[1], rows[3]

    def dense(e):
        return weighted(_dense_rows(e, e, y, y, True, cosine, pm, nm, low, high))

    def general(e):
        return weighted(contrastive_rows(e, e, y, y, True, cosine, pm, nm, low, high, size))

    def self_op(e):
        return weighted(contrastive_rows_self(e, y, cosine, pm, nm, low, high, size))

    want = dense(x)
    for fn in (general, self_op):
        got = fn(x)
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
        torch.testing.assert_close(got[2], want[2], rtol=0, atol=0)
        assert_close_vg(lambda e: fn(e)[0], lambda e: dense(e)[0], x)

    # against other references, and gradients into both sides
    r = F.normalize(torch.randn(37, 6, dtype=torch.float64, generator=g), dim=1)
    ry = torch.randint(0, 5, (37,), generator=g)
    assert_close_vg(
        lambda e, f: weighted(contrastive_rows(e, f, y, ry, False, cosine, pm, nm, low, high, size))[0],
        lambda e, f: weighted(_dense_rows(e, f, y, ry, False, cosine, pm, nm, low, high))[0], x, r)


def test_duplicates_have_finite_zero_gradient_and_match_pml():
    # B > 25: torch.cdist takes its matrix-product path, whose d for duplicates is rounding
    # noise; margins keep every such pair flat on both sides so the values are exact
    g = torch.Generator().manual_seed(6)
    x = torch.randn(40, 8, dtype=torch.float64, generator=g)
    y = torch.randint(0, 4, (40,), generator=g)
    x[10:20] = x[0]  # ten copies of one row, some positives, some negatives of it
    y[10:15] = y[0]
    kw = {"pos_margin": 0.05, "neg_margin": 0.8}
    _, pml = pml_pair("ContrastiveLoss", kw)
    fused = mo.losses.ContrastiveLoss(backend="cpu", **kw)
    v = assert_close_vg(lambda e: fused(e, y), lambda e: pml(e, y), x)
    assert torch.isfinite(v)
    x32 = x.float().requires_grad_()
    fused(x32, y).backward()
    assert torch.isfinite(x32.grad).all()


def test_empty_batch_and_op_on_empty_inputs():
    x, y = torch.zeros(0, 5, requires_grad=True), torch.zeros(0, dtype=torch.long)
    assert mo.losses.ContrastiveLoss(backend="cpu")(x, y).item() == 0.0  # PML's zero
    outs = torch.ops.metrix_ops.contrastive_self_fwd(x.detach(), y, False, 0.0, 1.0, -math.inf,
                                                     math.inf, 16)
    assert [o.shape for o in outs] == [(0,)] * 4
    r = torch.randn(3, 5)
    outs = torch.ops.metrix_ops.contrastive_fwd(x.detach(), r, y, torch.zeros(3, dtype=torch.long),
                                                False, False, 0.0, 1.0, 0.0, math.inf, 16)
    assert [o.shape for o in outs] == [(0,)] * 4


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 1e-4), (torch.bfloat16, 1e-4)])
def test_low_precision_inputs(dtype, tol):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(40, 16, generator=g).to(dtype)
    y = torch.randint(0, 6, (40,), generator=g)
    fused, ref = pair(neg_margin=1.1)
    # the same (rounded) inputs in fp64 on the reference: the op computes in fp32
    v_ref, (g_ref,) = _vg(lambda e: ref(e, y), x.double())
    v, (gx,) = _vg(lambda e: fused(e, y), x)
    assert v.dtype == torch.float32 and gx.dtype == dtype
    torch.testing.assert_close(v.double(), v_ref, rtol=tol, atol=1e-6)
    torch.testing.assert_close(gx.double(), g_ref.to(dtype).double(), rtol=2e-2, atol=1e-3)


def _vg(fn, x):
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    return out.detach(), torch.autograd.grad(out, [x])


def test_routes_and_refuses():
    x, y = make_case(CASES[1])
    assert "ContrastiveLoss" in mo.backend.FUSED["cpu"]
    it = mo.miners.MultiSimilarityMiner()(x, y)
    auto, ref = mo.losses.ContrastiveLoss(backend="auto"), mo.losses.ContrastiveLoss(backend="reference")
    torch.testing.assert_close(auto(x, y, it), ref(x, y, it))
    torch.testing.assert_close(mo.losses.ContrastiveLoss(backend="cpu")(x, y, it),
                               ref(x, y, it))  # an indices_tuple: fused/indices/
    # a reducer that is not a ratio of totals runs on the reference: same error as there
    red = mo.reducers.DivisorReducer()
    with pytest.raises(ValueError, match="divisor"):
        mo.losses.ContrastiveLoss(backend="cpu", reducer=red)(x, y)
    # a distance the op does not cover
    lp1 = mo.distances.LpDistance(p=1)
    with pytest.raises(NotImplementedError):
        mo.losses.ContrastiveLoss(backend="cpu", distance=lp1)(x, y)


def test_input_checks_name_the_argument():
    x, y = F.normalize(torch.randn(5, 3), dim=1), torch.arange(5)
    op = torch.ops.metrix_ops.contrastive_fwd
    with pytest.raises(RuntimeError, match="ref_labels must be int64"):
        op(x, x, y, y[:4], False, False, 0.0, 1.0, -1.0, 9.0, 4)
    with pytest.raises(RuntimeError, match="x must be float32 or float64"):
        op(x.half(), x.half(), y, y, False, False, 0.0, 1.0, -1.0, 9.0, 4)
    with pytest.raises(RuntimeError, match="x and r must have the same D"):
        op(x, x[:, :2], y, y, False, False, 0.0, 1.0, -1.0, 9.0, 4)
    with pytest.raises(RuntimeError, match="chunk must be > 0"):
        op(x, x, y, y, False, False, 0.0, 1.0, -1.0, 9.0, 0)
    with pytest.raises(RuntimeError, match="block must be > 0"):
        torch.ops.metrix_ops.contrastive_self_fwd(x, y, False, 0.0, 1.0, -1.0, 9.0, 0)
    with pytest.raises(RuntimeError, match=r"grad_neg must be of shape"):
        torch.ops.metrix_ops.contrastive_self_bwd(y.double(), y[:3].double(), x.double(), y,
                                                  False, 0.0, 1.0, -1.0, 9.0, 2)


def test_opcheck():
    x = F.normalize(torch.randn(11, 4, dtype=torch.float64), dim=1)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 0])
    r = F.normalize(torch.randn(7, 4, dtype=torch.float64), dim=1)
    ry = torch.tensor([0, 1, 1, 2, 3, 5, 0])
    ops = torch.ops.metrix_ops
    common = (False, 0.1, 0.9, 0.0, math.inf)
    torch.library.opcheck(ops.contrastive_fwd.default,
                          (x.clone().requires_grad_(), r.clone().requires_grad_(), y, ry, False)
                          + common + (3,))
    torch.library.opcheck(ops.contrastive_self_fwd.default,
                          (x.clone().requires_grad_(), y) + common + (4,))
    g = torch.randn(2, 11, dtype=torch.float64)
    torch.library.opcheck(ops.contrastive_bwd.default, (g[0], g[1], x, r, y, ry, False) + common + (3,))
    torch.library.opcheck(ops.contrastive_self_bwd.default, (g[0], g[1], x, y) + common + (4,))
    # raw rows (the L2 of unnormalised embeddings): the symmetric op's `raw` form, and the
    # general op's (anchors against references)
    raw_common = (False, 0.1, 6.0, 0.0, math.inf, 4, True)
    xr, rr = 3 * x, 3 * r
    torch.library.opcheck(ops.contrastive_self_fwd.default,
                          (xr.clone().requires_grad_(), y) + raw_common)
    torch.library.opcheck(ops.contrastive_self_bwd.default, (g[0], g[1], xr, y) + raw_common)
    torch.library.opcheck(ops.contrastive_fwd.default,
                          (xr.clone().requires_grad_(), rr.clone().requires_grad_(), y, ry,
                           False) + raw_common[:-2] + (3, True))
    torch.library.opcheck(ops.contrastive_bwd.default,
                          (g[0], g[1], xr, rr, y, ry, False) + raw_common[:-2] + (3, True))


def test_compile_fullgraph_matches_eager():
    from metrix_ops.ops.contrastive import contrastive_rows, contrastive_rows_self
    x = F.normalize(torch.randn(9, 5), dim=1).requires_grad_()
    y = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3, 3])

    def f(e):
        ps, pc, ns, nc = contrastive_rows_self(e, y, False, 0.0, 1.0, 0.0, None, 4)
        qs, qc, ms, mc = contrastive_rows(e, e, y, y, True, False, 0.0, 1.0, 0.0, None, 4)
        return ps.sum() / pc.sum().clamp_min(1) + ns.sum() / nc.sum().clamp_min(1) + qs.sum() + ms.sum()

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), f(x))
    ga = torch.autograd.grad(compiled(x), x)[0]
    gb = torch.autograd.grad(f(x), x)[0]
    torch.testing.assert_close(ga, gb)


def _near_duplicates(b, m=None, seed=0):
    """b rows of 3 classes (and, with m, m reference rows) where rows 0, 1, 4 share a class:
    row 1 within ~1e-4 of row 0 after normalising, row 4 a multiple of row 0 (the same unit
    row)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 7, generator=g)
    y = torch.arange(b) % 3
    x[1] = x[0] + 1e-4 * torch.randn(7, generator=g)
    x[4] = 3 * x[0]
    y[1] = y[4] = y[0]
    if m is None:
        return x, y, None, None
    r = torch.cat([x[:5], torch.randn(m - 5, 7, generator=g)])
    return x, y, r, torch.cat([y[:5], torch.arange(m - 5) % 3])


@pytest.mark.parametrize("power", [1, 2])
@pytest.mark.parametrize("b, m", [(6, None), (25, None), (9, 25), (25, 12)])
def test_near_duplicates_in_small_calls_count_as_pml(b, m, power):
    """At most 25 rows a side, PML's cdist takes exact row differences, so a positive pair
    ~1e-4 apart has that distance and AvgNonZero counts it (pos_margin 0); the fused ops'
    √(2 − 2s) of a cosine rounded to 1 gives 0 and leaves it out, which moves the mean by
    far more than rounding. There "auto" runs the reference: PML's value and gradients."""
    from pytorch_metric_learning import distances as pd
    from pytorch_metric_learning import losses as pl
    x, y, r, ry = _near_duplicates(b, m)
    ours = mo.losses.ContrastiveLoss(distance=mo.distances.LpDistance(power=power))
    pml = pl.ContrastiveLoss(distance=pd.LpDistance(power=power))
    if r is None:
        assert_close_vg(lambda e: ours(e, y), lambda e: pml(e, y), x, rtol=1e-5, atol=1e-6)
    else:
        assert_close_vg(lambda e, q: ours(e, y, ref_emb=q, ref_labels=ry),
                        lambda e, q: pml(e, y, ref_emb=q, ref_labels=ry), x, r,
                        rtol=1e-5, atol=1e-6)
    # the case is one where it matters: the fused op alone leaves the pair out
    fused = mo.losses.ContrastiveLoss(distance=mo.distances.LpDistance(power=power),
                                      backend="cpu")
    args = (y,) if r is None else (y, None, r, ry)
    assert not math.isclose(fused(x, *args).item(), pml(x, *args).item(), rel_tol=1e-3)


def test_near_duplicates_past_25_rows_keep_the_fused_op():
    """Past 25 rows PML's cdist is the Gram form as well (its value for such a pair is
    rounding noise), and auto keeps the fused op: the same numbers as backend='cpu'."""
    x, y, _, _ = _near_duplicates(26)
    auto = mo.losses.ContrastiveLoss()
    cpu = mo.losses.ContrastiveLoss(backend="cpu")
    assert torch.equal(auto(x, y), cpu(x, y))
    # a cosine distance has no such pair: the fused op at any size
    cos = mo.distances.CosineSimilarity()
    x, y, _, _ = _near_duplicates(6)
    assert torch.equal(mo.losses.ContrastiveLoss(distance=cos)(x, y),
                       mo.losses.ContrastiveLoss(distance=cos, backend="cpu")(x, y))
