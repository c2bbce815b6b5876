"""The fused CPU path for calls with an indices_tuple (metrix_ops/fused/indices/, the
pair_sims op) against the reference and PML: index tuples from PML's miners and random ones
(duplicates, self pairs, triplets, one pair, empty), the shared cases, both distances,
every reducer, ref_emb, fp64 / fp32 / half; the op's opcheck, checks and determinism; that
backend="auto" runs it; bad tuples; the loss option miner=."""
import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import miners as pm

import metrix_ops as mo
from cases import CASE_IDS, CASES, assert_close_vg, make_case, pml_pair
from metrix_ops.fused import indices as indices_mod
from metrix_ops.ops import pair_sims as ps_mod

pytestmark = pytest.mark.skipif(not ps_mod.HAS_OP, reason="extension (pair_sims op) not built")


@pytest.fixture(autouse=True)
def pair_path_always(monkeypatch):
    """The small cases' tuples list most pairs, which the fused path sends to the dense
    reference (fused/indices DENSE_FRACTION); here the pair path runs whatever the density."""
    monkeypatch.setattr(indices_mod, "DENSE_FRACTION", float("inf"))

NAMES = ["ContrastiveLoss", "MultiSimilarityLoss", "TripletMarginLoss", "CircleLoss",
         "NTXentLoss", "SupConLoss", "GeneralizedLiftedStructureLoss", "LiftedStructureLoss",
         "NPairsLoss"]
# hyper-parameters that put terms on both sides of every hinge on these cases
PARAMS = {
    "ContrastiveLoss": {"pos_margin": 0.3, "neg_margin": 1.2},
    "MultiSimilarityLoss": {"alpha": 3.0, "beta": 20.0, "base": 0.3},
    "TripletMarginLoss": {"margin": 0.4},
    "CircleLoss": {"m": 0.3, "gamma": 30.0},
    "NTXentLoss": {"temperature": 0.3},
    "SupConLoss": {"temperature": 0.2},
    "GeneralizedLiftedStructureLoss": {"neg_margin": 1.3, "pos_margin": 0.2},
    "LiftedStructureLoss": {"neg_margin": 1.3, "pos_margin": 0.2},
    "NPairsLoss": {},
}
# a second distance each loss takes (its default's counterpart); None: only its default
OTHER_DIST = {
    "ContrastiveLoss": lambda: mo.distances.CosineSimilarity(),
    "MultiSimilarityLoss": lambda: mo.distances.LpDistance(),
    "TripletMarginLoss": lambda: mo.distances.CosineSimilarity(),
    "CircleLoss": None,
    "NTXentLoss": lambda: mo.distances.LpDistance(power=2),
    "SupConLoss": lambda: mo.distances.LpDistance(),
    "GeneralizedLiftedStructureLoss": lambda: mo.distances.CosineSimilarity(),
    "LiftedStructureLoss": lambda: mo.distances.LpDistance(power=2),
    "NPairsLoss": lambda: mo.distances.DotProductSimilarity(normalize_embeddings=False),
}
REDUCERS = ["MeanReducer", "SumReducer", "AvgNonZeroReducer"]


def losses(name, backend="cpu", **kw):
    return getattr(mo.losses, name)(backend=backend, **{**PARAMS[name], **kw})


def random_pairs(b, m, n, g, self_pairs):
    """A random pair tuple: n draws from few rows, every third pair listed twice, and when
    asked self pairs (i, i) on both sides. A pair may be both positive and negative (the
    reference takes that; PML's mask-based losses assert against it)."""
    t = [torch.randint(0, s, (n,), generator=g) for s in (b, m, b, m)]
    t = [torch.cat([x, x[: n // 3]]) for x in t]  # every third pair twice
    if self_pairs:
        k = torch.arange(min(b, m, 3))
        t = [torch.cat([x, k]) for x in t]
    return tuple(t)


def labelled_pairs(y, ry, n, g, self_pairs):
    """random_pairs split by label as a miner would: same-label pairs positive (self pairs
    among them), the others negative."""
    a, c, _, _ = random_pairs(len(y), len(ry), 2 * n, g, self_pairs)
    same = y[a] == ry[c]
    return a[same], c[same], a[~same], c[~same]


def labelled_triplets(y, ry, n, g):
    """n random triplets, those with y[a] = ry[p] ≠ ry[n] kept (repeats among them)."""
    a = torch.randint(0, len(y), (n,), generator=g)
    p, q = (torch.randint(0, len(ry), (n,), generator=g) for _ in range(2))
    keep = (y[a] == ry[p]) & (y[a] != ry[q])
    return a[keep], p[keep], q[keep]


def tuples(x, y, seed=0, self_pairs=True, overlapping=False):
    """Named index tuples for the batch x, labels y (the batch as the references); with
    `overlapping`, also a random tuple whose pairs may be on both sides."""
    g = torch.Generator().manual_seed(seed)
    b = len(y)
    e = torch.empty(0, dtype=torch.long)
    xd = x.detach()
    out = {
        "ms_miner": pm.MultiSimilarityMiner(0.2)(xd, y),
        "triplet_miner": pm.TripletMarginMiner(0.3, type_of_triplets="all")(xd, y),
        "random_pairs": labelled_pairs(y, y, 2 * b, g, self_pairs),
        "random_triplets": labelled_triplets(y, y, 4 * b, g),
        "one_pair": (torch.tensor([0]), torch.tensor([b - 1]), e, e),
        "empty": (e, e, e, e),
    }
    if overlapping:
        out["overlapping"] = random_pairs(b, b, 2 * b, g, self_pairs)
        out["arbitrary_triplets"] = tuple(torch.randint(0, b, (2 * b,), generator=g)
                                          for _ in range(3))
    return out


TUPLE_KINDS = list(tuples(*make_case(CASES[0]), overlapping=True).keys())


def _self_pairs_ok(case):
    # torch.cdist (the reference's, PML's) takes its matrix-product path past 25 rows, where
    # d(x, x) is rounding noise (~1e-8) instead of 0: a self pair's hinge term then differs
    # from the exact 0 the fused path (and cdist's direct path) gives
    return case[1] <= 25


@pytest.mark.parametrize("kind", TUPLE_KINDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("name", NAMES)
def test_matches_reference_fp64(name, case, kind, one_thread):
    x, y = make_case(case)
    it = tuples(x, y, self_pairs=_self_pairs_ok(case), overlapping=True)[kind]
    fused, ref = losses(name), losses(name, "reference")
    assert_close_vg(lambda e: fused(e, y, it), lambda e: ref(e, y, it), x)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("name", [n for n in NAMES if OTHER_DIST[n] is not None])
def test_other_distance_matches_reference(name, case, one_thread):
    x, y = make_case(case, seed=3)
    for kind, it in tuples(x, y, seed=3, self_pairs=_self_pairs_ok(case), overlapping=True).items():
        fused = losses(name, distance=OTHER_DIST[name]())
        ref = losses(name, "reference", distance=OTHER_DIST[name]())
        assert_close_vg(lambda e: fused(e, y, it), lambda e: ref(e, y, it), x)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("name", NAMES)
def test_matches_pml(name, case, one_thread):
    x, y = make_case(case, seed=1)
    _, pml = pml_pair(name, PARAMS[name])
    fused = losses(name)
    for kind, it in tuples(x, y, seed=1, self_pairs=_self_pairs_ok(case)).items():
        assert_close_vg(lambda e: fused(e, y, it), lambda e: pml(e, y, it), x)


@pytest.mark.parametrize("name", NAMES)
def test_fp32(name, one_thread):
    for case in (CASES[0], CASES[1], CASES[7]):
        x, y = make_case(case, dtype=torch.float32, seed=4)
        fused, ref = losses(name), losses(name, "reference")
        for kind, it in tuples(x, y, seed=4, self_pairs=_self_pairs_ok(case)).items():
            assert_close_vg(lambda e: fused(e, y, it), lambda e: ref(e, y, it), x,
                            rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_half_inputs(name, dtype):
    x, y = make_case(CASES[1], seed=5)
    x = x.detach().to(dtype).requires_grad_()
    it = tuples(x, y, seed=5)["random_pairs"]
    fused, ref = losses(name), losses(name, "reference")
    v = fused(x, y, it)
    assert v.dtype == torch.float32
    (gx,) = torch.autograd.grad(v, x)
    assert gx.dtype == dtype and torch.isfinite(gx).all()
    # the reference on the same (rounded) inputs in fp32: the fused path computes in fp32
    assert_close_vg(lambda e: fused(e, y, it), lambda e: ref(e, y, it), x.detach().float(),
                    rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("reducer", REDUCERS + ["ThresholdReducer"])
@pytest.mark.parametrize("name", NAMES)
def test_reducers_match_reference_and_pml(name, reducer, one_thread):
    from pytorch_metric_learning import reducers as pr

    def ours(cls):
        return cls(low=0.05, high=1.5) if reducer == "ThresholdReducer" else cls()

    x, y = make_case(CASES[1], seed=6)
    fused = losses(name, reducer=ours(getattr(mo.reducers, reducer)))
    ref = losses(name, "reference", reducer=ours(getattr(mo.reducers, reducer)))
    from pytorch_metric_learning import losses as pl
    # given at construction: PML wraps it for losses with two sub-losses (MultipleReducers)
    pml = getattr(pl, name)(reducer=ours(getattr(pr, reducer)), **PARAMS[name])
    for kind, it in tuples(x, y, seed=6, self_pairs=False).items():
        assert_close_vg(lambda e: fused(e, y, it), lambda e: ref(e, y, it), x)
        assert_close_vg(lambda e: fused(e, y, it), lambda e: pml(e, y, it), x)


@pytest.mark.parametrize("name", NAMES)
def test_divisor_reducer_errors_as_reference(name):
    x, y = make_case(CASES[0])
    it = tuples(x, y)["ms_miner"]
    red = mo.reducers.DivisorReducer()
    with pytest.raises(ValueError, match="divisor") as want:
        losses(name, "reference", reducer=red)(x, y, it)
    with pytest.raises(ValueError, match="divisor") as got:
        losses(name, reducer=red)(x, y, it)
    assert str(got.value) == str(want.value)


@pytest.mark.parametrize("m", [19, 7])
@pytest.mark.parametrize("name", [n for n in NAMES if n != "NPairsLoss"])
def test_ref_emb(name, m, one_thread):
    g = torch.Generator().manual_seed(m)
    x = torch.randn(12, 6, dtype=torch.float64, generator=g)
    r = torch.randn(m, 6, dtype=torch.float64, generator=g)
    y, ry = torch.randint(0, 3, (12,), generator=g), torch.randint(0, 3, (m,), generator=g)
    its = [labelled_pairs(y, ry, 20, g, self_pairs=True),
           labelled_triplets(y, ry, 60, g),
           pm.MultiSimilarityMiner(0.3)(x, y, r, ry),
           pm.TripletMarginMiner(0.5, type_of_triplets="all")(x, y, r, ry)]
    for dist in [None] + ([OTHER_DIST[name]] if OTHER_DIST[name] else []):
        kw = {} if dist is None else {"distance": dist()}
        fused, ref = losses(name, **kw), losses(name, "reference", **kw)
        for it in its + [random_pairs(12, m, 20, g, self_pairs=True),
                         tuple(torch.randint(0, s, (25,), generator=g) for s in (12, m, m))]:
            assert_close_vg(lambda e, f: fused(e, y, it, f, ry), lambda e, f: ref(e, y, it, f, ry),
                            x, r)
    # against PML (default distance): every pair of ref_emb's rows is a reference
    pml = pml_pair(name, PARAMS[name])[1]
    fused = losses(name)
    for it in its:
        assert_close_vg(lambda e, f: fused(e, y, it, f, ry), lambda e, f: pml(e, y, it, f, ry), x, r)


def test_triplet_options(one_thread):
    """swap and smooth_loss (the clean op covers neither), and triplets_per_anchor, which an
    indices_tuple overrides."""
    x, y = make_case(CASES[1], seed=7)
    for kw in ({"swap": True}, {"smooth_loss": True}, {"swap": True, "smooth_loss": True},
               {"triplets_per_anchor": 3}):
        for dist in (None, mo.distances.CosineSimilarity()):
            extra = {} if dist is None else {"distance": dist}
            fused = losses("TripletMarginLoss", **kw, **extra)
            ref = losses("TripletMarginLoss", "reference", **kw, **extra)
            for it in tuples(x, y, seed=7).values():
                assert_close_vg(lambda e: fused(e, y, it), lambda e: ref(e, y, it), x)
    # swap with ref_emb: d(r_p, r_n) from the references (the reference's documented choice)
    r = torch.randn(17, 16, dtype=torch.float64)
    ry = torch.randint(0, 6, (17,))
    it = tuple(torch.randint(0, s, (30,)) for s in (31, 17, 17))
    fused, ref = (losses("TripletMarginLoss", b, swap=True) for b in ("cpu", "reference"))
    assert_close_vg(lambda e, f: fused(e, y, it, f, ry), lambda e, f: ref(e, y, it, f, ry), x, r)


def test_labels_not_needed_where_the_reference_needs_none(one_thread):
    x, y = make_case(CASES[0])
    it = tuples(x, y)["random_pairs"]
    for name in ("ContrastiveLoss", "TripletMarginLoss", "MultiSimilarityLoss", "NTXentLoss"):
        assert_close_vg(lambda e: losses(name)(e, None, it),
                        lambda e: losses(name, "reference")(e, None, it), x)
    with pytest.raises(ValueError, match="NPairsLoss needs labels"):
        losses("NPairsLoss")(x, None, it)


def _spy(monkeypatch):
    """Counts the pair_sims op's calls (and the ProxyNCA op's, which NPairs runs on)."""
    from metrix_ops.fused import npairs  # where fused/indices/npairs.py's loss runs the op
    from metrix_ops.fused.indices import common
    calls = []
    for mod, attr in ((common, "pair_sims"), (npairs, "proxy_nca_rows")):
        orig = getattr(mod, attr)

        def wrapped(*a, _orig=orig, **k):
            calls.append(1)
            return _orig(*a, **k)
        monkeypatch.setattr(mod, attr, wrapped)
    return calls


@pytest.mark.parametrize("name", NAMES)
def test_auto_runs_the_fused_op(name, monkeypatch):
    x, y = make_case(CASES[1])
    it = tuples(x, y)["ms_miner"]
    ref = losses(name, "reference")(x, y, it)
    calls = _spy(monkeypatch)
    out = losses(name, "auto")(x, y, it)
    assert calls, f"{name}: backend='auto' did not run the fused indices_tuple op"
    torch.testing.assert_close(out, ref)


def test_uncovered_calls_fall_back_or_refuse():
    x, y = make_case(CASES[0])
    it = tuples(x, y)["random_pairs"]
    for name, dist in (("ContrastiveLoss", mo.distances.LpDistance(p=1)),
                       ("TripletMarginLoss", mo.distances.LpDistance(p=3)),
                       ("MultiSimilarityLoss", mo.distances.CosineSimilarity(power=2))):
        auto, ref = losses(name, "auto", distance=dist), losses(name, "reference", distance=dist)
        torch.testing.assert_close(auto(x, y, it), ref(x, y, it))
        with pytest.raises(NotImplementedError, match=f"does not cover this {name} call"):
            losses(name, distance=dist)(x, y, it)
    # CircleLoss with another distance: the reference's (PML's) ValueError under auto
    with pytest.raises(ValueError, match="CircleLoss requires the distance"):
        losses("CircleLoss", "auto", distance=mo.distances.DotProductSimilarity())(x, y, it)


@pytest.mark.parametrize("name,miner", [
    ("ContrastiveLoss", lambda: pm.MultiSimilarityMiner(0.2)),
    ("ContrastiveLoss", lambda: mo.miners.MultiSimilarityMiner(0.2)),
    # (TripletMarginMiner and BatchHardMiner run inside the triplet op: test_triplet_miner_option)
    ("TripletMarginLoss", lambda: pm.MultiSimilarityMiner(0.3)),
    ("TripletMarginLoss", lambda: pm.PairMarginMiner(0.0, 1.5)),
    ("CircleLoss", lambda: pm.PairMarginMiner(0.2, 0.5)),
    ("NTXentLoss", lambda: pm.MultiSimilarityMiner(0.3)),
    ("SupConLoss", lambda: pm.TripletMarginMiner(0.3)),
    ("GeneralizedLiftedStructureLoss", lambda: pm.BatchHardMiner()),
    ("LiftedStructureLoss", lambda: pm.MultiSimilarityMiner(0.3)),
    ("NPairsLoss", lambda: pm.MultiSimilarityMiner(0.3)),
    ("MultiSimilarityLoss", lambda: pm.TripletMarginMiner(0.2, type_of_triplets="hard")),
])
def test_miner_option_runs_the_fused_op(name, miner, monkeypatch):
    x, y = make_case(CASES[1], seed=8)
    ref = losses(name, "reference")
    theirs = pml_pair(name, PARAMS[name])[1]
    calls = _spy(monkeypatch)
    for backend in ("cpu", "auto"):
        ours = losses(name, backend, miner=miner())
        assert_close_vg(lambda e: ours(e, y), lambda e: ref(e, y, miner()(e.detach(), y)), x)
        assert_close_vg(lambda e: ours(e, y), lambda e: theirs(e, y, miner()(e.detach(), y)), x)
    assert calls


def test_bad_tuples_name_the_argument():
    x, y = make_case(CASES[0])
    b = len(y)
    i = torch.arange(3)
    bad = [((i, i), ValueError, "indices_tuple must be a tuple of 3"),
           ((i, i, i, i, i), ValueError, "indices_tuple must be a tuple of 3"),
           ((i, i + b, i, i), ValueError, r"indices_tuple\[1\] holds indices outside \[0, 13\)"),
           ((i - 1, i, i), ValueError, r"indices_tuple\[0\] holds indices outside"),
           ((i, i.float(), i, i), TypeError, r"indices_tuple\[1\] must be a 1-D integer tensor"),
           ((i, i, i > 0), TypeError, r"indices_tuple\[2\] must be a 1-D integer tensor"),
           ((i, i[:2], i, i), ValueError, r"indices_tuple entries \(0, 1\) must have equal"),
           ((i, i, i[:1]), ValueError, r"indices_tuple entries \(0, 1, 2\) must have equal")]
    for name in NAMES:
        for it, exc, msg in bad:
            with pytest.raises(exc, match=msg):
                losses(name)(x, y, it)
    # with ref_emb the references' size bounds positives and negatives
    r = torch.randn(4, x.shape[1], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"indices_tuple\[1\] holds indices outside \[0, 4\)"):
        losses("ContrastiveLoss")(x, y, (i, i + 2, i, i), r, torch.arange(4))


def test_int32_indices(one_thread):
    x, y = make_case(CASES[1])
    for name in NAMES:
        it = tuples(x, y)["random_pairs"]
        it32 = tuple(t.int() for t in it)
        assert_close_vg(lambda e: losses(name)(e, y, it32), lambda e: losses(name)(e, y, it), x,
                        rtol=0, atol=0)


# -- the op itself -------------------------------------------------------------------------

def _op_inputs(dtype=torch.float64, b=9, m=6, p=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(b, 5, dtype=dtype, generator=g), dim=1)
    r = F.normalize(torch.randn(m, 5, dtype=dtype, generator=g), dim=1)
    rows, cols = torch.randint(0, b, (p,), generator=g), torch.randint(0, m, (p,), generator=g)
    return x, r, rows, cols


def test_op_values_and_gradients_against_gather():
    from metrix_ops.ops.pair_sims import pair_sims
    for dtype, rtol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        x, r, rows, cols = _op_inputs(dtype)
        w = torch.randn(len(rows), dtype=dtype)
        assert_close_vg(lambda a, c: (pair_sims(a, c, rows, cols) * w).sum(),
                        lambda a, c: ((a[rows] * c[cols]).sum(1) * w).sum(), x, r,
                        rtol=rtol, atol=rtol)
        # the same tensor on both sides (the batch against itself): gradients add up
        assert_close_vg(lambda a: (pair_sims(a, a, rows % 6, cols) * w).sum(),
                        lambda a: ((a[rows % 6] * a[cols]).sum(1) * w).sum(), x,
                        rtol=rtol, atol=rtol)


def test_op_empty_and_opcheck():
    from metrix_ops.ops.pair_sims import pair_sims
    x, r, rows, cols = _op_inputs()
    e = torch.empty(0, dtype=torch.long)
    out = pair_sims(x, r, e, e)
    assert out.shape == (0,) and out.dtype == x.dtype
    ops = torch.ops.metrix_ops
    for rr, cc in ((rows, cols), (e, e), (rows[:1], cols[:1])):
        torch.library.opcheck(ops.pair_sims_fwd.default,
                              (x.clone().requires_grad_(), r.clone().requires_grad_(), rr, cc))
        g = torch.randn(len(rr), dtype=x.dtype)
        torch.library.opcheck(ops.pair_sims_bwd.default, (g, x, r, rr, cc))


def test_op_checks_name_the_argument():
    x, r, rows, cols = _op_inputs()
    op = torch.ops.metrix_ops.pair_sims_fwd
    with pytest.raises(RuntimeError, match=r"rows must be in \[0, 9\)"):
        op(x, r, rows + 9, cols)
    with pytest.raises(RuntimeError, match=r"cols must be in \[0, 6\)"):
        op(x, r, rows, cols - 1)
    with pytest.raises(RuntimeError, match="rows and cols must have the same length"):
        op(x, r, rows, cols[:3])
    with pytest.raises(RuntimeError, match="rows must be 1-D int64"):
        op(x, r, rows.int(), cols)
    with pytest.raises(RuntimeError, match="x must be float32 or float64"):
        op(x.half(), r.half(), rows, cols)
    with pytest.raises(RuntimeError, match="x and r must have the same dtype"):
        op(x, r.float(), rows, cols)
    with pytest.raises(RuntimeError, match="x and r must have the same D"):
        op(x, r[:, :3], rows, cols)
    with pytest.raises(RuntimeError, match=r"grad must be of shape \(40,\)"):
        torch.ops.metrix_ops.pair_sims_bwd(torch.ones(3, dtype=x.dtype), x, r, rows, cols)


def test_op_backward_is_deterministic_across_threads():
    # many pairs on few rows: a racy or atomic scatter would change the summation order
    x, r, rows, cols = _op_inputs(torch.float32, b=7, m=5, p=200_000, seed=9)
    g = torch.randn(len(rows))
    n = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, max(n, 2)):
            torch.set_num_threads(threads)
            outs.append(torch.ops.metrix_ops.pair_sims_bwd(g, x, r, rows, cols))
    finally:
        torch.set_num_threads(n)
    for dx, dr in outs[1:]:
        assert torch.equal(dx, outs[0][0]) and torch.equal(dr, outs[0][1])
    want_dx = torch.zeros_like(x, dtype=torch.float64).index_add_(0, rows, g[:, None].double() * r[cols].double())
    torch.testing.assert_close(outs[0][0].double(), want_dx, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("name", NAMES)
def test_no_batch_by_batch_matrix(name):
    """B = 200 000: a B×B matrix would be 160 GB in fp32; the listed pairs' path needs
    O(B·D + P)."""
    g = torch.Generator().manual_seed(10)
    b = 200_000
    x = torch.randn(b, 4, generator=g, requires_grad=True)
    y = torch.randint(0, 50_000, (b,), generator=g)
    a = torch.randint(0, b, (3000,), generator=g)
    it = (a, a.flip(0), a.roll(7), torch.randint(0, b, (3000,), generator=g))
    out = losses(name)(x, y, it)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(x.grad).all()


# -- ProxyNCALoss: the tuple weights examples (PML's convert_to_weights over the anchors) -----

def _proxy_call(name, backend, c, d, **kw):
    from torch.func import functional_call
    if backend == "pml":
        from pytorch_metric_learning import losses as pl
        mod = getattr(pl, name)(c, d, **kw)
    else:
        mod = getattr(mo.losses, name)(c, d, backend=backend, **kw)
    return lambda y, it: lambda e, p: functional_call(mod, {"proxies": p}, (e, y, it))


NCA_SETTINGS = {  # ours, PML's (ProxyNCA++'s temperature is PML's softmax_scale / T)
    "l2": ({}, {}),
    "cosine": ({"distance": mo.distances.CosineSimilarity()}, {"distance": "cosine"}),
    "temperature": ({"softmax_scale": 2.0, "temperature": 0.5}, {"softmax_scale": 4.0}),
}


@pytest.mark.parametrize("setting", list(NCA_SETTINGS))
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_proxy_nca_weights_match_reference_and_pml(case, setting, monkeypatch, one_thread):
    from pytorch_metric_learning import distances as pd

    from metrix_ops.fused.indices import proxies
    x, y = make_case(case, seed=11)
    c, dim = int(y.max()) + 2, x.shape[1]
    p = torch.randn(c, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    calls = []
    real = proxies.proxy_nca_rows
    monkeypatch.setattr(proxies, "proxy_nca_rows", lambda *a: calls.append(1) or real(*a))
    kw, pml_kw = NCA_SETTINGS[setting]
    pml_kw = {k: (pd.CosineSimilarity() if k == "distance" else v) for k, v in pml_kw.items()}
    for kind, it in tuples(x, y, seed=11, overlapping=True).items():
        fused, ref = (_proxy_call("ProxyNCALoss", b, c, dim, **kw)(y, it) for b in ("cpu", "reference"))
        assert_close_vg(fused, ref, x, p)
        assert_close_vg(fused, _proxy_call("ProxyNCALoss", "pml", c, dim, **pml_kw)(y, it), x, p)
    assert calls


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_proxy_nca_underflow_dropped_before_weights(case):
    """softmax_scale 900 on cosines: some examples' own-proxy probability underflows to 0 and
    is dropped (before the weights, as PML) whatever its weight. Values only: the reference's
    (and PML's) gradient is NaN there, the fused op's finite."""
    x, y = make_case(case, seed=12)
    c, dim = int(y.max()) + 2, x.shape[1]
    p = torch.randn(c, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    kw = {"distance": mo.distances.CosineSimilarity(), "softmax_scale": 900.0}
    for kind, it in tuples(x, y, seed=12, overlapping=True).items():
        xg = x.detach().clone().requires_grad_()
        v = _proxy_call("ProxyNCALoss", "cpu", c, dim, **kw)(y, it)(xg, p)
        torch.testing.assert_close(v, _proxy_call("ProxyNCALoss", "reference", c, dim, **kw)(y, it)(x, p),
                                   equal_nan=True)
        if v.requires_grad and torch.isfinite(v):
            v.backward()
            assert torch.isfinite(xg.grad).all()


# -- ProxyAnchorLoss: w − 1 (every position counted) inside each exponent --------------------

PA_SETTINGS = {"default": {}, "margin_alpha": {"margin": 0.3, "alpha": 16.0}}


@pytest.mark.parametrize("setting", list(PA_SETTINGS))
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_proxy_anchor_weights_match_reference_and_pml(case, setting, monkeypatch, one_thread):
    """The weighted op against the reference and PML on every tuple kind (miners' pairs and
    triplets, random tuples, one pair, empty tuples: all ones), values and gradients into
    the embeddings and the proxies; a dense tuple stays on the op (no pair list to beat)."""
    from metrix_ops.fused.indices import proxies
    x, y = make_case(case, seed=14)
    c, dim = int(y.max()) + 2, x.shape[1]  # a proxy without examples, too
    p = torch.randn(c, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(14))
    calls = []
    real = proxies.proxy_anchor_terms
    monkeypatch.setattr(proxies, "proxy_anchor_terms",
                        lambda *a, **k: calls.append(k["log_w"]) or real(*a, **k))
    kw = PA_SETTINGS[setting]
    for kind, it in tuples(x, y, seed=14, overlapping=True).items():
        fused, ref = (_proxy_call("ProxyAnchorLoss", b, c, dim, **kw)(y, it)
                      for b in ("cpu", "reference"))
        assert_close_vg(fused, ref, x, p)
        assert_close_vg(fused, _proxy_call("ProxyAnchorLoss", "pml", c, dim, **kw)(y, it), x, p)
    assert len(calls) >= len(TUPLE_KINDS)  # every kind ran the op (twice: value, gradient)
    assert len(y) < 3 or any(bool((w < 0).any()) for w in calls)  # some weights were < 1


def test_proxy_anchor_weighted_op_float32_and_checks():
    """fp32 within fp32 tolerance of the float64 op; α = 32 with cosines near 1 does not
    overflow; a log_w of the wrong shape or dtype is refused by name."""
    from metrix_ops.ops.proxy_anchor import proxy_anchor_terms
    g = torch.Generator().manual_seed(15)
    x = F.normalize(torch.randn(45, 9, dtype=torch.float64, generator=g), dim=1)
    p = torch.cat([x[:3], F.normalize(torch.randn(4, 9, dtype=torch.float64, generator=g), dim=1)])
    y = torch.randint(0, 7, (45,), generator=g)
    lw = -torch.rand(45, dtype=torch.float64, generator=g)
    want = proxy_anchor_terms(x, p, y, 32.0, 0.1, log_w=lw)
    got = proxy_anchor_terms(x.float(), p.float(), y, 32.0, 0.1, log_w=lw.float())
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
    # the weights shift the terms: all-zero log-weights are the unweighted op
    for a, b in zip(proxy_anchor_terms(x, p, y, 32.0, 0.1, log_w=torch.zeros_like(lw)),
                    proxy_anchor_terms(x, p, y, 32.0, 0.1)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    op = torch.ops.metrix_ops.proxy_anchor_weighted_fwd
    with pytest.raises(RuntimeError, match="log_w must be a \\(45,\\) tensor"):
        op(x, p, y, lw[:5], 32.0, 0.1, 8)
    with pytest.raises(RuntimeError, match="log_w must be"):
        op(x, p, y, lw.float(), 32.0, 0.1, 8)
    torch.library.opcheck(op.default, (x.requires_grad_(), p.requires_grad_(), y, lw, 32.0, 0.1, 3))


def test_self_pairs_past_25_rows_are_exact_zero_distances():
    """Past 25 rows torch.cdist (the reference's and PML's) may give d(x, x) as rounding noise
    (~1e-8 in fp64), which AvgNonZero counts as a positive term; the fused path's d(x, x) is
    exactly 0 (as cdist's direct path below 26 rows), so a positive self pair adds nothing:
    the loss equals the reference's without those pairs."""
    g = torch.Generator().manual_seed(13)
    x = torch.randn(40, 8, dtype=torch.float64, generator=g)
    y = torch.randint(0, 4, (40,), generator=g)
    a1, p, a2, n = labelled_pairs(y, y, 60, g, self_pairs=False)
    a1, p = a1[a1 != p], p[a1 != p]  # random draws may hold self pairs too
    k = torch.arange(5)
    with_self = (torch.cat([a1, k]), torch.cat([p, k]), a2, n)
    fused, ref = (losses("ContrastiveLoss", b, pos_margin=0.0) for b in ("cpu", "reference"))
    assert_close_vg(lambda e: fused(e, y, with_self), lambda e: ref(e, y, (a1, p, a2, n)), x)


@pytest.mark.parametrize("fraction,fused", [(0.25, False), (0.9, True)])
def test_dense_tuples_take_the_dense_reference(fraction, fused, monkeypatch):
    """A tuple listing at least DENSE_FRACTION of all pairs runs the reference (no pair_sims
    call), a sparser one the pair op; both equal the reference."""
    monkeypatch.setattr(indices_mod, "DENSE_FRACTION", fraction)
    calls = []
    real = torch.ops.metrix_ops.pair_sims_fwd
    monkeypatch.setattr(torch.ops.metrix_ops, "pair_sims_fwd",
                        lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(20, 6, dtype=torch.float64, generator=g)
    y = torch.randint(0, 4, (20,), generator=g)
    a1, p, a2, n = pm.MultiSimilarityMiner(0.5)(x, y)
    tup = (a1[:60], p[:60], a2[:100], n[:100])  # 160 of the 400 pairs: 0.4
    fused_loss, ref = (mo.losses.ContrastiveLoss(backend=b) for b in ("cpu", "reference"))
    assert_close_vg(lambda e: fused_loss(e, y, tup), lambda e: ref(e, y, tup), x)
    assert bool(calls) == fused
