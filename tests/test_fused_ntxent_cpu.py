"""The fused CPU NT-Xent and SupCon ops against the reference (which matches PML): values and
gradients w.r.t. embeddings and ref_emb over odd shapes, label layouts, chunk sizes,
reducers, dtypes and extreme temperatures; opcheck, bad input, backend choice."""
import pytest
import torch
import torch.nn.functional as F

import metrix_ops as mo
import metrix_ops.fused.ntxent as fused_ntx
import metrix_ops.ops.ntxent as ntx_ops
from cases import CASE_IDS, CASES, assert_close_vg, make_case, value_and_grad
from metrix_ops import _ext

pytestmark = pytest.mark.skipif(not _ext.HAS_EXT, reason="extension not built")

NAMES = ["NTXentLoss", "SupConLoss"]
REDUCERS = {"mean": mo.reducers.MeanReducer, "sum": mo.reducers.SumReducer,
            "avg_nonzero": mo.reducers.AvgNonZeroReducer,
            "threshold": lambda: mo.reducers.ThresholdReducer(low=0.3, high=3.0)}


def pair(name, **kw):
    return (getattr(mo.losses, name)(backend="cpu", **kw),
            getattr(mo.losses, name)(backend="reference", **kw))


def labels_of(layout, b, g):
    if layout == "random":
        return torch.randint(0, max(1, b // 3), (b,), generator=g)
    if layout == "no_positives":
        return torch.arange(b)
    if layout == "one_class":
        return torch.zeros(b, dtype=torch.long)
    if layout == "singletons":  # classes of two, every third example a class of its own
        y = torch.arange(b) // 2
        y[::3] = 1000 + torch.arange(0, b, 3)
        return y
    raise ValueError(layout)


def data(b, d, layout="random", seed=0, dtype=torch.float64, dup=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    y = labels_of(layout, b, g)
    if dup and b >= 4:  # a duplicated positive and a duplicated negative
        x[1], y[1] = x[0], y[0]
        x[3], y[3] = x[2], y[2] + 7
    return x.to(dtype), y


@pytest.fixture
def chunk(request, monkeypatch):
    """Anchors per tile of the fused ops, and rows per block of SupCon's batch against
    itself; None: the ops' default."""
    if request.param is not None:
        monkeypatch.setattr(ntx_ops, "default_chunk", lambda n: request.param)
        monkeypatch.setattr(fused_ntx, "SELF_BLOCK", request.param)
    return request.param


@pytest.mark.parametrize("chunk", [1, 7, None], indirect=True)
@pytest.mark.parametrize("layout,dup", [("random", False), ("random", True), ("no_positives", False),
                                        ("one_class", False), ("singletons", True)])
@pytest.mark.parametrize("B,D", [(1, 3), (2, 16), (5, 37), (17, 3), (33, 16), (64, 37)])
@pytest.mark.parametrize("name", NAMES)
def test_matches_reference_fp64(name, B, D, layout, dup, chunk):
    x, y = data(B, D, layout, seed=B * 100 + D, dup=dup)
    fused, ref = pair(name)
    assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("name", NAMES)
def test_shared_cases(name, case):
    x, y = make_case(case)
    for kw in ({}, {"temperature": 0.5}):
        fused, ref = pair(name, **kw)
        assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x)


@pytest.mark.parametrize("red", list(REDUCERS))
@pytest.mark.parametrize("name", NAMES)
def test_reducers(name, red):
    for seed, (B, D) in enumerate([(33, 16), (17, 3), (64, 37)]):
        x, y = data(B, D, seed=seed + 40, dup=True)
        for t in (0.07, 0.5, 2.0):  # large τ: terms spread over the threshold window
            fused, ref = pair(name, temperature=t, reducer=REDUCERS[red]())
            assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x)


@pytest.mark.parametrize("chunk", [3, None], indirect=True)
@pytest.mark.parametrize("red", [None, "avg_nonzero", "sum"])
@pytest.mark.parametrize("name", NAMES)
def test_ref_emb(name, red, chunk):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(17, 16, dtype=torch.float64, generator=g)
    r = torch.randn(26, 16, dtype=torch.float64, generator=g)
    y, ry = torch.randint(0, 4, (17,), generator=g), torch.randint(0, 4, (26,), generator=g)
    kw = {} if red is None else {"reducer": REDUCERS[red]()}
    fused, ref = pair(name, **kw)
    assert_close_vg(lambda e, f: fused(e, y, ref_emb=f, ref_labels=ry),
                    lambda e, f: ref(e, y, ref_emb=f, ref_labels=ry), x, r)
    # the batch as ref_emb with another labels tensor: PML keeps the self pairs
    assert_close_vg(lambda e: fused(e, y, ref_emb=e, ref_labels=y.clone()),
                    lambda e: ref(e, y, ref_emb=e, ref_labels=y.clone()), x)
    # references with no positive of any anchor, or no negative
    for ry2 in (ry + 10, torch.full_like(ry, 2)):
        y2 = torch.full_like(y, 2)
        assert_close_vg(lambda e, f: fused(e, y2, ref_emb=f, ref_labels=ry2),
                        lambda e, f: ref(e, y2, ref_emb=f, ref_labels=ry2), x, r)


@pytest.mark.parametrize("t", [0.01, 0.03])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", NAMES)
def test_extreme_temperature(name, t, dtype):
    """τ = 0.01: logits ±100, e^{±100} past fp32's range; the terms PML rounds to exactly 0
    (which AvgNonZero drops) must be the same ones."""
    x, y = data(64, 16, seed=5, dup=True)
    x[10] = x[11] + 1e-3 * x[12]  # a near-duplicate pair
    fused, ref = pair(name, temperature=t)
    v, (gx,) = value_and_grad(lambda e: fused(e, y), x.to(dtype))
    assert torch.isfinite(v) and torch.isfinite(gx).all()
    rtol = 1e-6 if dtype == torch.float64 else 1e-4
    vr, (gxr,) = value_and_grad(lambda e: ref(e, y), x.to(dtype))
    torch.testing.assert_close(v, vr, rtol=rtol, atol=0)
    torch.testing.assert_close(gx, gxr, rtol=rtol, atol=rtol * gxr.abs().max())
    if dtype == torch.float64:
        for red in ("avg_nonzero", "threshold"):
            fused, ref = pair(name, temperature=t, reducer=REDUCERS[red]())
            assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x)


def test_two_views_and_zero_terms():
    """SimCLR's call; and a view so far ahead of its negatives that its NT-Xent term rounds
    to 0 (q = 1) as in PML, so AvgNonZero leaves it out."""
    g = torch.Generator().manual_seed(9)
    v1 = torch.randn(12, 24, dtype=torch.float64, generator=g)
    noise = torch.linspace(0.05, 1.5, 12, dtype=torch.float64)[:, None]  # near and far views
    x = torch.cat([v1, v1 + noise * torch.randn(12, 24, dtype=torch.float64, generator=g)])
    y = torch.arange(12).repeat(2)
    for name in NAMES:
        for t in (0.07, 0.01):
            fused, ref = pair(name, temperature=t)
            assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x)
    from metrix_ops.ops.ntxent import ntxent_rows
    xu = F.normalize(x, dim=1)
    sums, counts = ntxent_rows(xu, xu, y, y, True, 0.01, low=0.0)
    assert (counts < 1).any() and (counts == 1).any()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("name", NAMES)
def test_low_precision(name, dtype, tol):
    x, y = data(40, 16, seed=3)
    fused, ref = pair(name)
    xl = x.to(dtype).requires_grad_(True)
    out = fused(xl, y)
    out.backward()
    assert out.dtype == torch.float32 and torch.isfinite(out)
    assert xl.grad.dtype == dtype and torch.isfinite(xl.grad).all()
    # the same rounded inputs through the reference, in fp32 (what the driver computes in)
    ref32 = ref(xl.detach().float(), y)
    torch.testing.assert_close(out.detach(), ref32, rtol=1e-5 if dtype != torch.float32 else 1e-6, atol=1e-6)
    ref64 = ref(x, y)
    assert abs(float(out.detach()) - float(ref64)) <= tol * abs(float(ref64))


@pytest.mark.parametrize("name", NAMES)
def test_fp32_gradients_match_fp64_reference(name):
    x, y = data(64, 37, seed=8)
    r = torch.randn(50, 37, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ry = torch.randint(0, 20, (50,), generator=torch.Generator().manual_seed(2))
    fused, ref = pair(name)
    v, g = value_and_grad(lambda e, f: fused(e, y, ref_emb=f, ref_labels=ry), x.float(), r.float())
    vr, gr = value_and_grad(lambda e, f: ref(e, y, ref_emb=f, ref_labels=ry), x, r)
    torch.testing.assert_close(v.double(), vr, rtol=1e-4, atol=0)
    for a, b in zip(g, gr):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4 * b.abs().max())


def _unit_ref(name, e, r, y, ry, same_set, t):
    from metrix_ops.spec import LossInputs, get_spec
    inp = LossInputs(e, y, None, r, ry, same_set,
                     mo.distances.CosineSimilarity(normalize_embeddings=False))
    return get_spec(name).loss_dict(inp, temperature=t)["loss"]


def test_op_rows_chunks_and_gradcheck():
    from metrix_ops.ops.ntxent import ntxent_rows, supcon_rows
    g = torch.Generator().manual_seed(12)
    x = F.normalize(torch.randn(13, 5, dtype=torch.float64, generator=g), dim=1)
    r = F.normalize(torch.randn(9, 5, dtype=torch.float64, generator=g), dim=1)
    y, ry = torch.randint(0, 3, (13,), generator=g), torch.randint(0, 3, (9,), generator=g)
    full = supcon_rows(x, r, y, ry, False, 0.3, 13)
    ref = _unit_ref("SupConLoss", x, r, y, ry, False, 0.3)["losses"]
    torch.testing.assert_close(full, ref, rtol=1e-12, atol=1e-14)
    pairs = _unit_ref("NTXentLoss", x, r, y, ry, False, 0.3)
    a1 = pairs["indices"][0]
    want_sum = torch.zeros(13, dtype=torch.float64).index_add_(0, a1, pairs["losses"])
    for c in (1, 2, 5, 100):
        torch.testing.assert_close(supcon_rows(x, r, y, ry, False, 0.3, c), full, rtol=1e-12, atol=0)
        sums, counts = ntxent_rows(x, r, y, ry, False, 0.3, chunk=c)
        torch.testing.assert_close(sums, want_sum, rtol=1e-12, atol=1e-14)
        assert torch.equal(counts, torch.bincount(a1, minlength=13))
    w = torch.randn(13, dtype=torch.float64, generator=g)  # unequal row weights
    leaves = (x.clone().requires_grad_(), r.clone().requires_grad_())
    assert torch.autograd.gradcheck(lambda e, f: (ntxent_rows(e, f, y, ry, False, 0.3, chunk=4)[0] * w).sum(), leaves)
    assert torch.autograd.gradcheck(lambda e, f: (supcon_rows(e, f, y, ry, False, 0.3, 4) * w).sum(), leaves)
    # the batch against itself: one tensor as x and r, self pairs excluded
    xs = leaves[0]
    assert torch.autograd.gradcheck(lambda e: (ntxent_rows(e, e, y, y, True, 0.3, chunk=4)[0] * w).sum(), (xs,))
    assert torch.autograd.gradcheck(lambda e: (supcon_rows(e, e, y, y, True, 0.3, 4) * w).sum(), (xs,))


def test_ntxent_self_op_sums_windows_blocks_and_gradcheck():
    """NT-Xent's op for the batch against itself (symmetric blocks; the pair losses after the
    walk) against the reference's pair losses summed per anchor, for blocks from one row to
    all, with and without a window on the pair losses, a duplicate row, a class of one (no
    pair) and a class spanning every block; finite differences."""
    from metrix_ops.ops.ntxent import ntxent_rows_self
    g = torch.Generator().manual_seed(22)
    x = F.normalize(torch.randn(19, 5, dtype=torch.float64, generator=g), dim=1)
    x[6] = x[2]
    y = torch.randint(0, 4, (19,), generator=g)
    y[0] = 9
    pairs = _unit_ref("NTXentLoss", x, x, y, y, True, 0.3)
    a1, losses = pairs["indices"][0], pairs["losses"]
    q30, q70 = losses.quantile(torch.tensor([0.3, 0.7], dtype=torch.float64)).tolist()
    for low, high in ((None, None), (q30, None), (None, q70), (q30, q70)):
        keep = torch.ones_like(losses, dtype=torch.bool)
        keep &= losses > (low if low is not None else -float("inf"))
        keep &= losses < (high if high is not None else float("inf"))
        want = torch.zeros(19, dtype=torch.float64).index_add_(0, a1[keep], losses[keep])
        assert 0 < keep.sum() and (low is None and high is None or not keep.all())
        for b in (1, 2, 5, 19, 100):
            sums, counts = ntxent_rows_self(x, y, 0.3, low, high, b)
            torch.testing.assert_close(sums, want, rtol=1e-12, atol=1e-13)
            assert torch.equal(counts, torch.bincount(a1[keep], minlength=19))
    w = torch.randn(19, dtype=torch.float64, generator=g)
    for b in (3, 100):
        assert torch.autograd.gradcheck(
            lambda e: (ntxent_rows_self(e, y, 0.3, None, None, b)[0] * w).sum(),
            (x.clone().requires_grad_(),))


def test_supcon_self_op_rows_blocks_and_gradcheck():
    """SupCon's op for the batch against itself (symmetric blocks, no row shift) against the
    reference's rows, for blocks from one row to all, with a duplicate row, a class of one
    (no positive: 0, no gradient) and finite differences."""
    from metrix_ops.ops.ntxent import supcon_rows_self
    g = torch.Generator().manual_seed(21)
    x = F.normalize(torch.randn(17, 5, dtype=torch.float64, generator=g), dim=1)
    x[4] = x[1]
    y = torch.randint(0, 4, (17,), generator=g)
    y[0] = 9
    want = _unit_ref("SupConLoss", x, x, y, y, True, 0.2)["losses"]
    assert want[0] == 0 and (want[1:] > 0).all()
    for b in (1, 2, 5, 17, 100):
        torch.testing.assert_close(supcon_rows_self(x, y, 0.2, b), want, rtol=1e-12, atol=1e-13)
    w = torch.randn(17, dtype=torch.float64, generator=g)
    for b in (3, 100):
        assert torch.autograd.gradcheck(lambda e: (supcon_rows_self(e, y, 0.2, b) * w).sum(),
                                        (x.clone().requires_grad_(),))


def test_opcheck():
    g = torch.Generator().manual_seed(13)
    x = F.normalize(torch.randn(9, 5, generator=g), dim=1).requires_grad_()
    r = F.normalize(torch.randn(7, 5, generator=g), dim=1).requires_grad_()
    y, ry = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3, 3]), torch.tensor([0, 1, 1, 2, 4, 3, 3])
    inf = float("inf")
    torch.library.opcheck(torch.ops.metrix_ops.ntxent_fwd.default,
                          (x, r, y, ry, False, 0.1, -inf, inf, 4))
    torch.library.opcheck(torch.ops.metrix_ops.ntxent_fwd.default,
                          (x, x.detach().clone().requires_grad_(), y, y, True, 0.1, 0.0, inf, 2))
    torch.library.opcheck(torch.ops.metrix_ops.supcon_fwd.default, (x, r, y, ry, False, 0.1, 4))
    torch.library.opcheck(torch.ops.metrix_ops.supcon_fwd.default,
                          (x, x.detach().clone().requires_grad_(), y, y, True, 0.07, 3))
    torch.library.opcheck(torch.ops.metrix_ops.supcon_self_fwd.default, (x, y, 0.07, 3))
    torch.library.opcheck(torch.ops.metrix_ops.ntxent_self_fwd.default, (x, y, 0.1, -inf, inf, 3))
    torch.library.opcheck(torch.ops.metrix_ops.ntxent_self_fwd.default, (x, y, 0.5, 0.1, 3.0, 2))


@pytest.mark.parametrize("name", NAMES)
def test_compile_fullgraph(name):
    x, y = data(21, 8, seed=14)
    fused, ref = pair(name)
    compiled = torch.compile(lambda e: fused(e, y), fullgraph=True, backend="eager")
    assert_close_vg(compiled, lambda e: ref(e, y), x)
    y1 = torch.arange(21)  # no positives: PML's zero loss, as a select in the graph
    compiled1 = torch.compile(lambda e: fused(e, y1), fullgraph=True, backend="eager")
    assert_close_vg(compiled1, lambda e: ref(e, y1), x)


def test_detached_references_skip_their_gradient(monkeypatch):
    x, y = data(15, 6, seed=15)
    r, ry = data(11, 6, seed=16)
    seen = []
    real = torch.ops.metrix_ops.ntxent_bwd

    class Spy:
        def __call__(self, *a):
            seen.append(a[-1])
            return real(*a)

    monkeypatch.setattr(torch.ops.metrix_ops, "ntxent_bwd", Spy())
    for name in ("NTXentLoss",):
        fused, ref = pair(name)
        assert_close_vg(lambda e: fused(e, y, ref_emb=r, ref_labels=ry),
                        lambda e: ref(e, y, ref_emb=r, ref_labels=ry), x)
    assert seen == [False]


@pytest.mark.parametrize("name", NAMES)
def test_auto_calls_the_op(name, monkeypatch):
    import metrix_ops.fused as fused
    assert mo.backend.resolve("auto", name, torch.device("cpu")) == "cpu"
    calls = []
    # the batch against itself: the symmetric ops
    op = "ntxent_self_fwd" if name == "NTXentLoss" else "supcon_self_fwd"
    real = getattr(torch.ops.metrix_ops, op)
    monkeypatch.setattr(torch.ops.metrix_ops, op, lambda *a: calls.append(1) or real(*a))
    x, y = data(12, 5, seed=17)
    out = getattr(mo.losses, name)(backend="auto")(x, y)
    assert calls == [1]
    torch.testing.assert_close(out, pair(name)[1](x, y))
    assert fused.IMPLS[("cpu", name)]


@pytest.mark.parametrize("name", NAMES)
def test_falls_back_or_refuses_outside_its_scope(name):
    from pytorch_metric_learning import distances as pd
    x, y = make_case(CASES[1])
    it = mo.miners.MultiSimilarityMiner()(x, y)
    auto, ref = (getattr(mo.losses, name)(backend=b) for b in ("auto", "reference"))
    torch.testing.assert_close(auto(x, y, it), ref(x, y, it))
    torch.testing.assert_close(getattr(mo.losses, name)(backend="cpu")(x, y, it),
                               ref(x, y, it))  # an indices_tuple: fused/indices/
    for dist in (pd.LpDistance(), pd.DotProductSimilarity(), mo.distances.CosineSimilarity(normalize_embeddings=False)):
        a = getattr(mo.losses, name)(backend="auto", distance=dist)(x, y)
        torch.testing.assert_close(a, getattr(mo.losses, name)(backend="reference", distance=dist)(x, y))
        with pytest.raises(NotImplementedError, match=f"does not cover this {name} call"):
            getattr(mo.losses, name)(backend="cpu", distance=dist)(x, y)


def test_divisor_reducer_as_the_reference():
    x, y = data(12, 5, seed=18)
    for name in NAMES:
        with pytest.raises(ValueError, match="DivisorReducer needs"):
            getattr(mo.losses, name)(backend="cpu", reducer=mo.reducers.DivisorReducer())(x, y)


def test_bad_input_raises_clearly():
    x, y = data(6, 4, seed=19, dtype=torch.float32)
    r, ry = x[:5], y[:5]
    inf = float("inf")
    fwd, sfwd = torch.ops.metrix_ops.ntxent_fwd, torch.ops.metrix_ops.supcon_fwd
    with pytest.raises(RuntimeError, match="x must be 2-D"):
        fwd(x[0], r, y, ry, False, 0.1, -inf, inf, 2)
    with pytest.raises(RuntimeError, match="r must be 2-D"):
        sfwd(x, r[0], y, ry, False, 0.1, 2)
    with pytest.raises(RuntimeError, match="same D"):
        fwd(x, r[:, :3], y, ry, False, 0.1, -inf, inf, 2)
    with pytest.raises(RuntimeError, match="same dtype"):
        sfwd(x, r.double(), y, ry, False, 0.1, 2)
    with pytest.raises(RuntimeError, match=r"labels must be int64 of shape \(6,\)"):
        fwd(x, r, y[:5], ry, False, 0.1, -inf, inf, 2)
    with pytest.raises(RuntimeError, match=r"ref_labels must be int64 of shape \(5,\)"):
        sfwd(x, r, y, ry.int(), False, 0.1, 2)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        fwd(x.half(), r.half(), y, ry, False, 0.1, -inf, inf, 2)
    with pytest.raises(RuntimeError, match="chunk must be > 0"):
        sfwd(x, r, y, ry, False, 0.1, 0)
    with pytest.raises(RuntimeError, match="temperature must be finite and nonzero"):
        fwd(x, r, y, ry, False, 0.0, -inf, inf, 2)
    with pytest.raises(RuntimeError, match=r"grad_sums must be of shape \(6,\)"):
        torch.ops.metrix_ops.ntxent_bwd(torch.ones(5), x, r, y, ry, torch.ones(6), torch.ones(6),
                                        False, 0.1, -inf, inf, 2, True)
    with pytest.raises(RuntimeError, match=r"neg_sum must be of shape \(6,\)"):
        torch.ops.metrix_ops.ntxent_bwd(torch.ones(6), x, r, y, ry, torch.ones(6), torch.ones(3),
                                        False, 0.1, -inf, inf, 2, True)
    nfwd, nbwd = torch.ops.metrix_ops.ntxent_self_fwd, torch.ops.metrix_ops.ntxent_self_bwd
    with pytest.raises(RuntimeError, match="temperature must be finite and nonzero"):
        nfwd(x, y, 0.0, -inf, inf, 2)
    with pytest.raises(RuntimeError, match="block"):
        nfwd(x, y, 0.1, -inf, inf, 0)
    with pytest.raises(RuntimeError, match=r"w_total must be of shape \(6,\)"):
        nbwd(torch.ones(6), x, y, torch.ones(6), torch.ones(6), torch.ones(4), 0.1, -inf, inf, 2)
    self_fwd, self_bwd = torch.ops.metrix_ops.supcon_self_fwd, torch.ops.metrix_ops.supcon_self_bwd
    with pytest.raises(RuntimeError, match="temperature must be finite and nonzero"):
        self_fwd(x, y, float("nan"), 2)
    with pytest.raises(RuntimeError, match=r"labels must be int64 of shape \(6,\)"):
        self_fwd(x, y[:5], 0.1, 2)
    with pytest.raises(RuntimeError, match=r"lse must be of shape \(6,\)"):
        self_bwd(torch.ones(6), x, y, torch.ones(2), 0.1, 2)
    with pytest.raises(RuntimeError, match=r"lse must be of shape \(6,\)"):
        torch.ops.metrix_ops.supcon_bwd(torch.ones(6), x, r, y, ry, torch.ones(2), False, 0.1, 2, True)
