"""Fused CPU HPHNTripletLoss (clean and with Embedding Expansion) against the reference:
the mined indices (float64: exactly), loss and gradient, odd shapes, edge cases, chunking,
dtypes, fallbacks, errors, opcheck and backend="auto"."""
import pytest
import torch
import torch.nn.functional as F

import metrix_ops as mo
from metrix_ops import _ext
from metrix_ops.distances import CosineSimilarity, LpDistance
from metrix_ops.fused import hphn_triplet as fused_hphn
from metrix_ops.ops.ee_mining import all_segments, ee_hphn_mine
from metrix_ops.reference.expansion_mining import ExpandedBatch
from metrix_ops.reference.expansion_points import expansion_segments
from metrix_ops.reference.hphn_triplet import hardest_pair
from metrix_ops.spec import LossInputs

from cases import assert_close_vg
from test_fast_exp import LEVELS, simd_level

pytestmark = [pytest.mark.skipif(not _ext.HAS_EXT, reason="extension not built"),
              pytest.mark.usefixtures("one_thread")]


@pytest.fixture(params=[256, 3], ids=["chunk256", "chunk3"])
def chunk(request, monkeypatch):
    monkeypatch.setattr(fused_hphn, "CHUNK", request.param)
    return request.param


def batch(b, d, classes, seed=0, dtype=torch.float64, contiguous=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, classes, (b,), generator=g)
    if contiguous:  # rows 2t, 2t+1 share a label (pairs="adjacent")
        b -= b % 2
        x, y = x[:b], y[:b].clone()
        y[1::2] = y[0::2]
    return x, y


def losses(n, pairs="all", **kw):
    ee = None if n is None else mo.Expansion(n_points=n, pairs=pairs)
    return [mo.losses.HPHNTripletLoss(backend=be, expansion=ee, **kw) for be in ("cpu", "reference")]


def ref_picks(x, y, n, pairs, distance):
    """The reference's choices in the op's encoding [p, a_u, a_w, a_k, q_u, q_w, q_k]."""
    inp = LossInputs(x, y, None, x, y, True, distance)
    eb = ExpandedBatch(inp, mo.Expansion(n_points=n, pairs=pairs))
    inv = distance.is_inverted
    _, has_pos = hardest_pair(eb.clean, eb.pos, inv, farthest=True)
    m = eb.clean.masked_fill(~eb.pos, float("-inf") if not inv else float("inf"))
    p = (m.argmax(1) if not inv else m.argmin(1)).masked_fill(~has_pos, -1)
    masked = eb.closest.masked_fill(~eb.neg, float("-inf") if inv else float("inf"))
    q = masked.argmax(1) if inv else masked.argmin(1)
    a = eb.closest_a[torch.arange(len(x)), q]
    pts = eb.pts

    def enc(t):
        k = torch.where(pts.synthetic[t], torch.round(pts.lam[t] * (n + 1)).long(),
                        torch.full_like(t, n + 1))
        return torch.stack([pts.u[t], pts.w[t], k], 1)
    out = torch.cat([p[:, None], enc(a), enc(q)], 1)
    out[~eb.neg.any(1), 1:] = -1
    return out


def fused_picks(x, y, n, pairs, chunk):
    if n == 0:
        si = sj = y.new_empty(0)
    else:
        si, sj = all_segments(y) if pairs == "all" else expansion_segments(y, pairs)
    return ee_hphn_mine(F.normalize(x, dim=1), y, si, sj, n, chunk)


# ---------------------------------------------------------------- the mined indices
@pytest.mark.parametrize("n", [0, 1, 2, 8])
@pytest.mark.parametrize("pairs", ["all", "adjacent"])
@pytest.mark.parametrize("dist", [LpDistance, CosineSimilarity])
@pytest.mark.parametrize("b,d,classes", [(2, 3, 1), (7, 16, 3), (33, 16, 5), (130, 65, 20),
                                         (33, 3, 2)])
def test_indices_equal_reference(n, pairs, dist, b, d, classes):
    x, y = batch(b, d, classes, seed=b + n, contiguous=pairs == "adjacent")
    expect = ref_picks(x, y, n, pairs, dist())
    for chunk in (256, 1, 5):
        got = fused_picks(x, y, n, pairs, chunk)
        assert torch.equal(got, expect), (chunk, (got != expect).nonzero()[:5])


@pytest.mark.parametrize("n", [1, 3, 8])
def test_indices_equal_reference_pruning_cases(n):
    """The pruning paths of the op (whole classes, single segments on their arc's bound) and
    the segments it may not prune: coincident endpoints (duplicate rows, c = 1), antipodal
    ones (c = −1), endpoints whose arc maximum lies outside the segment, exact ties."""
    x, y = batch(300, 4, 40, seed=n)  # low dimension: large cosines, near-ties
    y[:12] = torch.arange(12) % 3  # three classes with hand-made segments
    x[3] = x[0]  # a coincident segment (0, 3); its points tie with x_0
    x[4] = -x[1]  # an antipodal segment (1, 4)
    x[6] = x[0] + 1e-9 * x[2]  # nearly coincident (0, 6)
    x[13], y[13] = x[5], (y[5] + 1) % 40  # a duplicate negative of row 5
    x[14], y[14] = x[7], y[7]  # a duplicate positive
    for dist in (LpDistance(), CosineSimilarity()):
        expect = ref_picks(x, y, n, "all", dist)
        for chunk in (256, 7):
            got = fused_picks(x, y, n, "all", chunk)
            assert torch.equal(got, expect), (chunk, (got != expect).nonzero()[:5])


@pytest.mark.parametrize("n", [3, 8])
def test_indices_equal_reference_low_dim_adjacent(n):
    """The synthetic anchor-side points' search from their floor (class bounds from the
    endpoints' class maxima, u built only on the classes that remain) on the official
    pairing, in 3-d: large cosines, many classes near the floor, near-ties."""
    x, y = batch(200, 3, 30, seed=20 + n, contiguous=True)
    for dist in (LpDistance(), CosineSimilarity()):
        expect = ref_picks(x, y, n, "adjacent", dist)
        for chunk in (256, 9):
            got = fused_picks(x, y, n, "adjacent", chunk)
            assert torch.equal(got, expect), (chunk, (got != expect).nonzero()[:5])


@pytest.mark.parametrize("n", [2, 8])
def test_indices_equal_reference_signed_floors(n):
    """The search from a floor (the best original negative for an original, the smaller of
    the endpoints' picks for a synthetic point) visits only the classes whose bound reaches
    it when the floor is positive, and every class when it is not: classes clustered at
    opposite poles (every negative cosine below 0) beside classes that overlap, with
    duplicate rows for exact ties, and rows split over many chunks."""
    g = torch.Generator().manual_seed(n)
    y = torch.arange(90) % 9
    x = torch.randn(90, 5, generator=g, dtype=torch.float64) * 0.3
    x[:, 0] += torch.where(y == 0, 2.0, -2.0).double()  # class 0 at +e0, the rest at -e0
    x[10] = x[1]  # an exact duplicate within class 1
    x[20] = x[30]  # and across classes 2 and 3
    x[9] = x[0]  # and within class 0
    for dist in (LpDistance(), CosineSimilarity()):
        expect = ref_picks(x, y, n, "all", dist)
        for chunk in (256, 11):
            got = fused_picks(x, y, n, "all", chunk)
            assert torch.equal(got, expect), (chunk, (got != expect).nonzero()[:5])
    # some anchors' floors are at or below 0 here
    xu = F.normalize(x, dim=1)
    s = (xu @ xu.t()).masked_fill(y[:, None] == y[None, :], float("-inf"))
    assert (s.max(1).values <= 0).any() and (s.max(1).values > 0).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_indices_equal_reference_realistic_pruning(dtype):
    """A shape where the synthetic points' search prunes as on real batches (~8 per class,
    n = 8, 24-d): a segment keeps few of the slots (the two-level marks, group maxima then
    slots), and the pair-of-arcs bound (all n × n pairs of two segments' points in one test)
    skips most of the segments those slots end. Any bound that skipped a pick would show."""
    x, y = batch(168, 24, 21, seed=5, dtype=dtype)
    expect = ref_picks(x.double(), y, 8, "all", CosineSimilarity())
    # fp32: the pair filter's double lanes differ per level (fp64 runs it scalar)
    for level in LEVELS if dtype == torch.float32 else ["auto"]:
        for chunk in (256, 30):
            with simd_level(level):
                got = fused_picks(x, y, 8, "all", chunk)
            assert torch.equal(got, expect), (level, chunk, (got != expect).nonzero()[:5])


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("n", [3, 8])
def test_fp32_indices_every_simd_level(level, n):
    """The synthetic anchor-side points' marks (a segment's n points at once: each slot's
    largest cosine over them against the floor, ee_closest.h's seg_marks) and their
    pair-of-arcs filter (arcs_filter, in double lanes), both compiled per x86 level, in fp32: the picks are bit-for-bit the scalar baseline's at every level and equal
    the reference's. Odd sizes leave lane tails of every width; duplicate rows make exact
    ties; 6-d rows make large cosines, so many slots reach their floor."""
    x, y = batch(203, 6, 25, seed=30 + n, dtype=torch.float32)
    x[1], y[1] = x[0], y[0]  # a duplicate positive: its segment's points coincide with x_0
    x[5], y[5] = x[3], (y[3] + 1) % 25  # a duplicate negative
    for chunk in (256, 40):
        with simd_level("baseline"):
            base = fused_picks(x, y, n, "all", chunk)
        with simd_level(level):
            got = fused_picks(x, y, n, "all", chunk)
        assert torch.equal(got, base), (chunk, (got != base).nonzero()[:5])
        assert torch.equal(got, ref_picks(x, y, n, "all", CosineSimilarity()))


def test_nan_row_hides_no_class_member():
    """A NaN row never wins, and does not hide the other members of its class (the op skips
    classes on their largest cosine, which must ignore NaN)."""
    x, y = batch(60, 5, 6, seed=9)
    y[:3] = torch.tensor([7, 8, 6])  # row 2: first of its class, no class's first negative
    y[3:8] = 6
    x[2] = float("nan")
    xu = F.normalize(x, dim=1)
    got = ee_hphn_mine(xu, y, y.new_empty(0), y.new_empty(0), 0, 256)
    s = (xu @ xu.t()).nan_to_num(float("-inf")).masked_fill(y[:, None] == y[None, :], float("-inf"))
    ok = torch.arange(60) != 2
    assert torch.equal(got[ok, 4], s.argmax(1)[ok])


def dense_batch_hard(xu, y):
    """Each anchor's farthest positive and closest negative by cosine on the whole matrix,
    lowest index on ties (argmax/argmin return the first), −1 where there is none."""
    s = xu @ xu.t()
    same = y[:, None] == y[None, :]
    pos = same & ~torch.eye(len(y), dtype=torch.bool)
    p = s.masked_fill(~pos, float("inf")).argmin(1).masked_fill(~pos.any(1), -1)
    q = s.masked_fill(same, float("-inf")).argmax(1).masked_fill(same.all(1), -1)
    return p, q


@pytest.mark.parametrize("seed", range(4))
def test_no_segment_miner_ties_across_chunks(seed):
    """Without segments the op mines from half of the Gram matrix (batch_hard_self.h): a
    chunk's rows take their picks from its block row and later slots their negatives from
    its columns. Rows drawn from a pool of four exact unit vectors tie everywhere, across
    chunks, and labels out of index order make slot order differ from index order: the
    picks must still be the lowest index on every tie."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0.6, 0.8, 0], [0, 0, -1.0]],
                        dtype=torch.float64)
    b = 41
    xu = pool[torch.randint(0, 4, (b,), generator=g)]
    y = torch.randint(0, 9, (b,), generator=g).flip(0)
    p, q = dense_batch_hard(xu, y)
    e = y.new_empty(0)
    for chunk in (1, 2, 5, 13, 256):
        got = ee_hphn_mine(xu, y, e, e, 0, chunk)
        assert torch.equal(got[:, 0], p), chunk
        assert torch.equal(got[:, 4], q), chunk
        has = q >= 0
        assert torch.equal(got[has, 1], torch.arange(b)[has]) and (got[has, 3] == 1).all()
        assert (got[~has, 1:] == -1).all()


def test_no_segment_miner_nan_rows():
    """A NaN row never wins; an anchor whose first candidate is NaN (or which is NaN) keeps
    that first candidate, as the full-row walk does (nothing beats NaN)."""
    x, y = batch(30, 4, 3, seed=11)
    xu = F.normalize(x, dim=1)
    xu[4] = float("nan")
    e = y.new_empty(0)
    got = ee_hphn_mine(xu, y, e, e, 0, 5)
    for i in range(30):
        same = (y == y[i]).nonzero().flatten().tolist()
        others = [j for j in same if j != i]
        negs = (y != y[i]).nonzero().flatten().tolist()
        s = xu[i] @ xu.t()
        if others:
            first = others[0]
            if s[first].isnan():
                assert got[i, 0] == first
            else:
                ok = [j for j in others if not s[j].isnan()]
                assert got[i, 0] == min(ok, key=lambda j: (s[j].item(), j))
        if negs:
            first = negs[0]
            if s[first].isnan():
                assert got[i, 4] == first
            else:
                ok = [j for j in negs if not s[j].isnan()]
                assert got[i, 4] == min(ok, key=lambda j: (-s[j].item(), j))


def test_all_segments_equal_reference_order():
    for seed, (b, k) in enumerate([(1, 1), (2, 1), (9, 3), (40, 5), (64, 64), (50, 1)]):
        y = torch.randint(0, k, (b,), generator=torch.Generator().manual_seed(seed))
        got, expect = all_segments(y), expansion_segments(y, "all")
        assert all(torch.equal(g, e) for g, e in zip(got, expect))


# ---------------------------------------------------------------- loss and gradient
@pytest.mark.parametrize("n", [None, 0, 1, 2, 8])
@pytest.mark.parametrize("pairs", ["all", "adjacent"])
@pytest.mark.parametrize("b,d,classes", [(2, 3, 1), (7, 16, 3), (33, 65, 4), (33, 3, 2),
                                         (130, 16, 40)])
def test_loss_and_grad_float64(n, pairs, b, d, classes, chunk):
    if n is None and pairs == "adjacent":
        pytest.skip("pairs only matter with expansion")
    x, y = batch(b, d, classes, seed=3 * b + (n or 0), contiguous=pairs == "adjacent")
    for margin, reduction in ((0.2, "mean"), (1e-5, "sum"), (1.5, "mean")):
        cpu, ref = losses(n, pairs, margin=margin, reduction=reduction)
        v = assert_close_vg(lambda e: cpu(e, y), lambda e: ref(e, y), x)
        assert torch.isfinite(v)


@pytest.mark.parametrize("n", [None, 0, 2, 8])
@pytest.mark.parametrize("dist", ["l2", "cosine"])
def test_loss_and_grad_float32(n, dist):
    x, y = batch(130, 65, 12, seed=7, dtype=torch.float32)
    kw = {} if dist == "l2" else {"distance": CosineSimilarity()}
    cpu, ref = losses(n, **kw)
    assert_close_vg(lambda e: cpu(e, y), lambda e: ref(e, y), x, rtol=1e-4, atol=1e-6)


def test_cosine_distance_float64(chunk):
    x, y = batch(33, 16, 4, seed=11)
    for n in (None, 0, 3):
        cpu, ref = losses(n, distance=CosineSimilarity(), margin=0.1)
        assert_close_vg(lambda e: cpu(e, y), lambda e: ref(e, y), x)


def test_half_input():
    x, y = batch(33, 16, 4, seed=2, dtype=torch.float16)
    cpu, ref = losses(2)
    out = cpu(x, y)
    assert out.dtype == torch.float32
    assert_close_vg(lambda e: cpu(e, y), lambda e: ref(e, y), x, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n", [None, 0, 2])
@pytest.mark.parametrize("labels", [
    [0],  # B = 1: no positive, no negative
    [0, 0, 0, 0, 0],  # one class: no negatives, zero loss with a graph
    [0, 1, 2, 3, 4],  # singletons: no positive, zero loss
    [0, 0, 1, 2, 2, 2, 3],  # classes of size 1 among others
], ids=["b1", "one_class", "singletons", "size1_classes"])
def test_edge_labels(n, labels, chunk):
    y = torch.tensor(labels)
    x, _ = batch(len(labels), 5, 1, seed=4)
    cpu, ref = losses(n)
    v = assert_close_vg(lambda e: cpu(e, y), lambda e: ref(e, y), x)
    if len(set(labels)) in (1, len(labels)):
        assert v == 0


def test_duplicate_embeddings(chunk):
    x, y = batch(12, 6, 3, seed=5)
    x[1], y[1] = x[0], y[0]  # a duplicate positive
    x[5], y[5] = x[3], (y[3] + 1) % 3  # a duplicate negative: distance 0
    x[7] = x[9]
    for n in (None, 0, 1, 2, 8):
        cpu, ref = losses(n, margin=0.3)
        v = assert_close_vg(lambda e: cpu(e, y), lambda e: ref(e, y), x)
        assert torch.isfinite(v)
    xx = x.clone().requires_grad_()
    losses(2)[0](xx, y).backward()
    assert torch.isfinite(xx.grad).all()


def test_adjacent_needs_contiguous_pairs():
    x, y = batch(8, 4, 3, seed=1)
    y = torch.tensor([0, 1, 1, 1, 2, 2, 0, 0])
    cpu, _ = losses(2, "adjacent")
    with pytest.raises(ValueError, match="adjacent"):
        cpu(x, y)
    with pytest.raises(ValueError, match="even batch"):
        cpu(x[:7], y[:7])


def test_many_chunks_equal_one():
    x, y = batch(130, 16, 9, seed=8)
    si, sj = all_segments(y)
    xu = F.normalize(x, dim=1)
    one = ee_hphn_mine(xu, y, si, sj, 4, 1 << 20)
    assert (one[:, 0] >= 0).any() and (one[:, 4] >= 0).all()
    for c in (1, 7, 40):
        assert torch.equal(ee_hphn_mine(xu, y, si, sj, 4, c), one)


# ---------------------------------------------------------------- references (ref_emb)
REF_CASES = {  # (batch, batch classes, references, reference labels' range, seed)
    "random": (23, 5, 31, 7, 1),
    "no_positive_in_refs": (9, 3, 12, (3, 6), 2),  # reference labels disjoint from the batch's
    "one_class": (8, 1, 10, 1, 3),                 # no negative anywhere: the zero loss
    "b1": (1, 1, 6, 3, 4),
    "duplicates": (12, 3, 14, 3, 5),
}


def ref_data(b, classes, m, ref_range, seed, d=7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, dtype=torch.float64, generator=g)
    y = torch.randint(0, classes, (b,), generator=g)
    lo, hi = ref_range if isinstance(ref_range, tuple) else (0, ref_range)
    r = torch.randn(m, d, dtype=torch.float64, generator=g)
    ry = torch.randint(lo, hi, (m,), generator=g)
    return x, y, r, ry


@pytest.mark.parametrize("case", list(REF_CASES))
@pytest.mark.parametrize("dist", [None, CosineSimilarity])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ref_emb_equals_reference_and_pml(case, dist, reduction):
    """The batch against references: loss and gradients into both, against the reference and
    PML's TripletMarginLoss on BatchHardMiner triplets (what HPHN is without expansion)."""
    from pytorch_metric_learning import distances as pd
    from pytorch_metric_learning import losses as pl
    from pytorch_metric_learning import miners as pm
    from pytorch_metric_learning import reducers as pr
    x, y, r, ry = ref_data(*REF_CASES[case])
    if case == "duplicates":
        r[3], r[8], x[2] = r[1], r[1], r[1]  # tied distances: the lowest index wins
        ry[3] = ry[8] = ry[1]
    kw = dict(reduction=reduction, **({} if dist is None else {"distance": dist()}))
    cpu, ref = (mo.losses.HPHNTripletLoss(backend=be, **kw) for be in ("cpu", "reference"))
    assert_close_vg(lambda e, q: cpu(e, y, ref_emb=q, ref_labels=ry),
                    lambda e, q: ref(e, y, ref_emb=q, ref_labels=ry), x, r)
    pdist = pd.LpDistance() if dist is None else pd.CosineSimilarity()
    red = pr.MeanReducer() if reduction == "mean" else pr.SumReducer()
    pml = pl.TripletMarginLoss(margin=0.2, distance=pdist, reducer=red)
    miner = pm.BatchHardMiner(distance=pdist)
    assert_close_vg(lambda e, q: cpu(e, y, ref_emb=q, ref_labels=ry),
                    lambda e, q: pml(e, y, miner(e, y, q, ry), q, ry), x, r)


def test_ref_emb_float32_and_empty_refs():
    x, y, r, ry = ref_data(*REF_CASES["random"])
    cpu, ref = (mo.losses.HPHNTripletLoss(backend=be) for be in ("cpu", "reference"))
    assert_close_vg(lambda e, q: cpu(e.float(), y, ref_emb=q.float(), ref_labels=ry).double(),
                    lambda e, q: ref(e, y, ref_emb=q, ref_labels=ry), x, r,
                    rtol=1e-4, atol=1e-6)
    # empty references: PML's zero loss, as an empty batch (test_empty_batch.py)
    assert cpu(x, y, ref_emb=r[:0], ref_labels=ry[:0]).item() == 0.0


# ---------------------------------------------------------------- dispatch and op contract
def test_auto_picks_cpu(monkeypatch):
    called = []
    orig = fused_hphn.impl
    monkeypatch.setitem(mo.fused.IMPLS, ("cpu", "HPHNTripletLoss"),
                        (fused_hphn.supports, lambda *a, **k: called.append(1) or orig(*a, **k)))
    x, y = batch(20, 8, 3, seed=1, contiguous=True)
    for ee in (None, mo.Expansion(n_points=0), mo.Expansion(n_points=8),
               mo.Expansion(n_points=2, pairs="adjacent")):
        mo.losses.HPHNTripletLoss(backend="auto", expansion=ee)(x, y)
    assert len(called) == 4
    mo.losses.HPHNTripletLoss()(x, y, ref_emb=x.clone(), ref_labels=y.clone())
    assert len(called) == 5  # references: the clean loss by refs_impl
    # not covered: unnormalised points with L2, a non-normalising distance, EE with ref_emb
    before = len(called)
    mo.losses.HPHNTripletLoss(expansion=mo.Expansion(n_points=2, normalize=False))(x, y)
    mo.losses.HPHNTripletLoss(distance=LpDistance(normalize_embeddings=False))(x, y)
    with pytest.raises(NotImplementedError):
        mo.losses.HPHNTripletLoss(expansion=mo.Expansion(n_points=2))(
            x, y, ref_emb=x.clone(), ref_labels=y.clone())
    assert len(called) == before
    with pytest.raises(NotImplementedError):
        mo.losses.HPHNTripletLoss(backend="cpu", expansion=mo.Expansion(
            n_points=2, normalize=False))(x, y)


def test_op_errors():
    x = F.normalize(torch.randn(6, 4, dtype=torch.float64), dim=1)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    si, sj = torch.tensor([0, 2]), torch.tensor([1, 3])
    op = torch.ops.metrix_ops.ee_hphn_mine
    for n in (2, 0):  # n = 0 too: segments are checked even where no point is placed on them
        with pytest.raises(RuntimeError, match="different labels"):
            op(x, y, torch.tensor([0]), torch.tensor([2]), n, 4)
    with pytest.raises(RuntimeError, match="distinct rows"):
        op(x, y, torch.tensor([0]), torch.tensor([9]), 2, 4)
    with pytest.raises(RuntimeError, match="chunk"):
        op(x, y, si, sj, 2, 0)
    with pytest.raises(RuntimeError, match="n_points"):
        op(x, y, si, sj, -1, 4)
    with pytest.raises(RuntimeError, match="labels"):
        op(x, y[:5], si, sj, 2, 4)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        op(x.half(), y, si, sj, 2, 4)
    with pytest.raises(RuntimeError, match="same shape"):
        op(x, y, si, sj[:1], 2, 4)


def test_opcheck():
    x, y = batch(17, 8, 4, seed=3)
    si, sj = all_segments(y)
    for dt in (torch.float64, torch.float32):
        torch.library.opcheck(torch.ops.metrix_ops.ee_hphn_mine.default,
                              (F.normalize(x, dim=1).to(dt), y, si, sj, 3, 5),
                              test_utils=("test_schema", "test_faketensor",
                                          "test_aot_dispatch_dynamic"))
