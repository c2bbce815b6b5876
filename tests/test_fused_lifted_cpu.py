"""The fused CPU lifted-structure ops (GeneralizedLiftedStructureLoss, LiftedStructureLoss)
against the reference: values and gradients (embeddings and ref_emb) over odd shapes and
label layouts (no positives, one class, singletons, duplicate rows: d = 0 pairs), both
supported distances, chunk and tile boundaries, references (PML's partner quirk),
reducers, dtypes, large margins; the ops' checks, opcheck, torch.compile, and that
backend="auto" runs the ops."""
import pytest
import torch
import torch.nn.functional as F

import metrix_ops as mo
import metrix_ops.fused.generalized_lifted as fgl
import metrix_ops.fused.lifted_structure as fls
from cases import CASE_IDS, CASES, assert_close_vg, make_case, value_and_grad
from metrix_ops import _ext
from metrix_ops.ops.lifted import gen_lifted_rows, gen_lifted_rows_self, lifted_rows, lifted_rows_self

pytestmark = pytest.mark.skipif(not _ext.HAS_EXT, reason="extension not built")

NAMES = ["GeneralizedLiftedStructureLoss", "LiftedStructureLoss"]
HYPER = [{}, {"neg_margin": 0.6, "pos_margin": 0.1}]
DISTANCES = {"lp": None, "cosine": mo.distances.CosineSimilarity}


def pair(name, dist=None, **kw):
    if dist is not None:
        kw["distance"] = dist()
    return (getattr(mo.losses, name)(backend="cpu", **kw),
            getattr(mo.losses, name)(backend="reference", **kw))


@pytest.fixture
def op_calls(monkeypatch):
    """The fused ops each module reached (spies on the calls of fused/*)."""
    calls = []
    for mod, fn in ((fgl, "gen_lifted_rows"), (fgl, "gen_lifted_rows_self"), (fls, "lifted_rows"),
                    (fls, "lifted_rows_self")):
        real = getattr(mod, fn)
        monkeypatch.setattr(mod, fn, lambda *a, _r=real, _n=fn, **k: calls.append(_n) or _r(*a, **k))
    return calls


LAYOUTS = {
    "random": lambda b, g: torch.randint(0, max(1, b // 4), (b,), generator=g),
    "no_positives": lambda b, g: torch.randperm(b, generator=g),
    "one_class": lambda b, g: torch.full((b,), 3),
    "singletons": lambda b, g: torch.cat([torch.arange(b // 2), torch.randint(0, 3, (b - b // 2,), generator=g)]),
    "duplicates": lambda b, g: torch.randint(0, 3, (b,), generator=g),
}


def layout_case(b, d, layout, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed + 97 * b + d)
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    y = LAYOUTS[layout](b, g)
    if layout == "duplicates" and b >= 4:
        # duplicate rows within a class and across classes: d = 0 positive and negative pairs
        x[1], y[1] = x[0], y[0]
        x[3], y[3] = x[2], (y[2] + 1) % 3
        x[-1], y[-1] = x[0], y[0]
    return x.to(dtype), y


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("d", [3, 16, 37])
@pytest.mark.parametrize("b", [1, 2, 5, 17, 33, 64])
def test_matches_reference_fp64(name, b, d, layout):
    x, y = layout_case(b, d, layout)
    for dist in DISTANCES.values():
        for kw in HYPER:
            fused, ref = pair(name, dist, **kw)
            assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_shared_cases(name, case):
    x, y = make_case(case)
    for dist in DISTANCES.values():
        fused, ref = pair(name, dist, neg_margin=0.8, pos_margin=0.05)
        assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x)


def _ref_rows(name, e, r, y, ry, same_set, cosine, **kw):
    """The reference's per-element / per-pair losses on unit rows as given."""
    from metrix_ops.spec import LossInputs, get_spec
    dist = (mo.distances.CosineSimilarity(normalize_embeddings=False) if cosine
            else mo.distances.LpDistance(normalize_embeddings=False))
    inp = LossInputs(e, y, None, r, ry, same_set, dist)
    return get_spec(name).loss_dict(inp, **kw)["loss"]["losses"]


@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_chunk_boundaries(chunk, cosine):
    """Chunks of references (streaming) and tiles of the positive blocks (lifted: a class
    larger than a tile, groups of small classes) at every size, rows weighted unequally."""
    g = torch.Generator().manual_seed(chunk)
    x = F.normalize(torch.randn(29, 6, dtype=torch.float64, generator=g), dim=1)
    y = torch.cat([torch.zeros(11, dtype=torch.long), torch.randint(1, 8, (18,), generator=g)])
    y = y[torch.randperm(29, generator=g)]
    w = torch.rand(29, dtype=torch.float64, generator=g)
    kw = {"neg_margin": 1.1, "pos_margin": 0.2}

    u = lambda e: F.normalize(e, dim=1)  # noqa: E731  (the ops' s-gradient is tangent)
    assert_close_vg(lambda e: (gen_lifted_rows(u(e), u(e), y, y, True, cosine, 0.2, 1.1, chunk) * w).sum(),
                    lambda e: (_ref_rows(NAMES[0], u(e), u(e), y, y, True, cosine, **kw) * w).sum(), x)
    assert_close_vg(lambda e: lifted_rows(u(e), u(e), y, y, True, cosine, 0.2, 1.1, chunk=chunk)[0].sum(),
                    lambda e: _ref_rows(NAMES[1], u(e), u(e), y, y, True, cosine, **kw).sum(), x)
    # the symmetric self ops: blocks I <= J of `chunk` rows
    assert_close_vg(lambda e: (gen_lifted_rows_self(u(e), y, cosine, 0.2, 1.1, chunk) * w).sum(),
                    lambda e: (_ref_rows(NAMES[0], u(e), u(e), y, y, True, cosine, **kw) * w).sum(), x)
    assert_close_vg(lambda e: lifted_rows_self(u(e), y, cosine, 0.2, 1.1, block=chunk)[0].sum(),
                    lambda e: _ref_rows(NAMES[1], u(e), u(e), y, y, True, cosine, **kw).sum(), x)
    # windows of the reducers (AvgNonZero, Threshold): sums and counts of the kept terms
    terms = _ref_rows(NAMES[1], x.detach(), x.detach(), y, y, True, cosine, **kw)
    for low, high in ((0.0, None), (0.3, 1.5)):
        keep = (terms > low) & (terms < (float("inf") if high is None else high))
        for fn in (lambda: lifted_rows(x, x, y, y, True, cosine, 0.2, 1.1, low, high, chunk),
                   lambda: lifted_rows_self(x, y, cosine, 0.2, 1.1, low, high, chunk)):
            sums, counts = fn()
            assert int(counts.sum()) == int(keep.sum())
            torch.testing.assert_close(sums.sum(), terms[keep].sum())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dist", list(DISTANCES))
@pytest.mark.parametrize("m", [5, 13, 26])
def test_ref_emb(name, dist, m, op_calls):
    """ref_emb/ref_labels: M below, at and above B (the lifted loss's partner rows: PML
    compares the anchor index with the reference index p, so p < B picks batch row p)."""
    g = torch.Generator().manual_seed(m)
    x = torch.randn(13, 8, dtype=torch.float64, generator=g)
    r = torch.randn(m, 8, dtype=torch.float64, generator=g)
    y, ry = torch.randint(0, 4, (13,), generator=g), torch.randint(0, 4, (m,), generator=g)
    fused, ref = pair(name, DISTANCES[dist], neg_margin=0.7, pos_margin=0.1)
    assert_close_vg(lambda e, f: fused(e, y, ref_emb=f, ref_labels=ry),
                    lambda e, f: ref(e, y, ref_emb=f, ref_labels=ry), x, r)
    if m == 13:  # the batch's labels object: same_set, self pairs excluded
        assert_close_vg(lambda e, f: fused(e, y, ref_emb=f, ref_labels=y),
                        lambda e, f: ref(e, y, ref_emb=f, ref_labels=y), x, r)
        # the batch as ref_emb with another labels tensor: PML keeps the self pairs
        assert_close_vg(lambda e: fused(e, y, ref_emb=e, ref_labels=y.clone()),
                        lambda e: ref(e, y, ref_emb=e, ref_labels=y.clone()), x)
    assert op_calls


REDUCERS = [mo.reducers.MeanReducer, mo.reducers.SumReducer, mo.reducers.AvgNonZeroReducer,
            lambda: mo.reducers.ThresholdReducer(low=0.3), lambda: mo.reducers.ThresholdReducer(high=1.2),
            lambda: mo.reducers.ThresholdReducer(low=0.2, high=2.0)]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("red", range(len(REDUCERS)))
def test_reducers(name, red, op_calls):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(31, 16, dtype=torch.float64, generator=g)
    y = torch.randint(0, 6, (31,), generator=g)
    for kw in ({"neg_margin": 2.5, "pos_margin": 0.4}, {"neg_margin": 0.3, "pos_margin": 0.8}):
        fused, ref = pair(name, reducer=REDUCERS[red](), **kw)
        assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x)
        r = torch.randn(20, 16, dtype=torch.float64, generator=g)
        ry = torch.randint(0, 6, (20,), generator=g)
        assert_close_vg(lambda e, f: fused(e, y, ref_emb=f, ref_labels=ry),
                        lambda e, f: ref(e, y, ref_emb=f, ref_labels=ry), x, r)
    assert op_calls


def test_reducer_without_ratio_form():
    """DivisorReducer needs a divisor neither loss gives: the same error as the reference."""
    x, y = make_case(CASES[1])
    for name in NAMES:
        fused, ref = pair(name, reducer=mo.reducers.DivisorReducer())
        with pytest.raises(ValueError, match="needs the loss to give a divisor"):
            ref(x, y)
        with pytest.raises(ValueError, match="needs the loss to give a divisor"):
            fused(x, y)


@pytest.mark.parametrize("name", NAMES)
def test_fp32_matches_fp64_reference(name):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(67, 24, generator=g)
    y = torch.randint(0, 9, (67,), generator=g)
    x[5], y[5] = x[4], y[4]  # a duplicate: d = 0 in fp32 too
    for dist in DISTANCES.values():
        fused, ref = pair(name, dist)
        v, (gx,) = value_and_grad(lambda e: fused(e, y), x)
        vr, (gr,) = value_and_grad(lambda e: ref(e.double(), y), x.double())
        assert v.dtype == gx.dtype == torch.float32
        torch.testing.assert_close(v.double(), vr, rtol=1e-4, atol=0)
        torch.testing.assert_close(gx.double(), gr, rtol=1e-4, atol=1e-4 * gr.abs().max())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_half_inputs(name, dtype, tol):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 16, generator=g).to(dtype)
    y = torch.randint(0, 6, (40,), generator=g)
    fused, ref = pair(name)
    xl = x.clone().requires_grad_(True)
    out = fused(xl, y)
    out.backward()
    assert out.dtype == torch.float32 and torch.isfinite(out)
    assert xl.grad.dtype == dtype and torch.isfinite(xl.grad).all()
    torch.testing.assert_close(out.detach(), ref(x.float(), y), rtol=1e-5, atol=1e-6)
    want = ref(x.double(), y)
    assert abs(float(out.detach()) - float(want)) <= tol * abs(float(want))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kw", [{"neg_margin": 400.0, "pos_margin": 0.0},
                                {"neg_margin": 1.0, "pos_margin": -300.0},
                                {"neg_margin": 900.0, "pos_margin": 800.0}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_margins_do_not_overflow(name, kw, dtype):
    """Exponents of several hundred (e^{m⁻ − d} past fp32's and fp64's range) stay finite:
    every log-sum-exp is shifted by its largest exponent."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(24, 10, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (24,), generator=g)
    for dist in DISTANCES.values():
        fused, ref = pair(name, dist, **kw)
        v, (gx,) = value_and_grad(lambda e: fused(e, y), x.to(dtype))
        vr, (gr,) = value_and_grad(lambda e: ref(e, y), x)
        assert torch.isfinite(v) and torch.isfinite(gx).all()
        rtol = 1e-6 if dtype == torch.float64 else 1e-4
        torch.testing.assert_close(v.double(), vr, rtol=rtol, atol=0)
        torch.testing.assert_close(gx.double(), gr, rtol=rtol, atol=rtol * gr.abs().max())


def test_labels_far_apart():
    x, y = make_case(CASES[1])
    big = y * (2 ** 60) + 7
    for name in NAMES:
        fused, ref = pair(name)
        assert_close_vg(lambda e: fused(e, big), lambda e: ref(e, y), x)


def test_outside_scope_falls_back_or_refuses():
    x, y = make_case(CASES[1])
    it = mo.miners.MultiSimilarityMiner()(x, y)
    raw = mo.distances.LpDistance(p=1)  # (raw L2 is fused: tests/test_raw_l2.py)
    for name in NAMES:
        auto = getattr(mo.losses, name)(backend="auto")
        ref = getattr(mo.losses, name)(backend="reference")
        torch.testing.assert_close(auto(x, y, it), ref(x, y, it))
        torch.testing.assert_close(getattr(mo.losses, name)(backend="cpu")(x, y, it),
                                   ref(x, y, it))  # an indices_tuple: fused/indices/
        with pytest.raises(NotImplementedError, match=f"does not cover this {name} call"):
            getattr(mo.losses, name)(backend="cpu", distance=raw)(x, y)
        torch.testing.assert_close(getattr(mo.losses, name)(backend="auto", distance=raw)(x, y),
                                   getattr(mo.losses, name)(backend="reference", distance=raw)(x, y))


@pytest.mark.parametrize("name", NAMES)
def test_auto_runs_the_op(name, op_calls):
    x, y = make_case(CASES[1])
    auto = getattr(mo.losses, name)(backend="auto")
    torch.testing.assert_close(auto(x, y), getattr(mo.losses, name)(backend="reference")(x, y))
    assert op_calls == [{"GeneralizedLiftedStructureLoss": "gen_lifted_rows_self",
                         "LiftedStructureLoss": "lifted_rows_self"}[name]]
    r = x.detach().clone()  # another reference set: the general op
    torch.testing.assert_close(auto(x, y, ref_emb=r, ref_labels=y),
                               getattr(mo.losses, name)(backend="reference")(x, y, ref_emb=r, ref_labels=y))
    assert op_calls[1] == op_calls[0][:-len("_self")]


def _unit(b, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(b, d, generator=g), dim=1)


def test_opcheck():
    x = _unit(9, 5).requires_grad_()
    r = _unit(7, 5, 1).requires_grad_()
    y = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3, 3])
    ry = torch.tensor([0, 1, 1, 2, 4, 4, 5])
    for cosine in (False, True):
        torch.library.opcheck(torch.ops.metrix_ops.gen_lifted_fwd.default,
                              (x, r, y, ry, False, cosine, 0.1, 1.0, 3))
        torch.library.opcheck(torch.ops.metrix_ops.gen_lifted_fwd.default,
                              (x, x.detach().clone().requires_grad_(), y, y, True, cosine, 0.0, 0.8, 4))
        partner = torch.tensor([0, 1, 2, 3, 4, 5, 6])
        torch.library.opcheck(torch.ops.metrix_ops.lifted_fwd.default,
                              (x, r, y, ry, partner, False, cosine, 0.1, 1.0, -float("inf"),
                               float("inf"), 2))
        torch.library.opcheck(torch.ops.metrix_ops.lifted_fwd.default,
                              (x, x.detach().clone().requires_grad_(), y, y, torch.arange(9), True,
                               cosine, 0.0, 0.8, 0.0, float("inf"), 4))
        torch.library.opcheck(torch.ops.metrix_ops.gen_lifted_self_fwd.default,
                              (x, y, cosine, 0.1, 1.0, 4))
        torch.library.opcheck(torch.ops.metrix_ops.lifted_self_fwd.default,
                              (x, y, cosine, 0.1, 1.0, -float("inf"), float("inf"), 4))
        # rows of any norm (the L2 of unnormalised embeddings): the walks' `raw`
        torch.library.opcheck(torch.ops.metrix_ops.gen_lifted_self_fwd.default,
                              ((3 * x).detach().requires_grad_(), y, cosine, 0.5, 4.0, 4, True))
        torch.library.opcheck(torch.ops.metrix_ops.gen_lifted_fwd.default,
                              ((3 * x).detach().requires_grad_(), (3 * r).detach().requires_grad_(),
                               y, ry, False, cosine, 0.5, 4.0, 3, True))
        torch.library.opcheck(torch.ops.metrix_ops.lifted_self_fwd.default,
                              ((3 * x).detach().requires_grad_(), y, cosine, 0.5, 4.0,
                               -float("inf"), float("inf"), 4, True))
        torch.library.opcheck(torch.ops.metrix_ops.lifted_fwd.default,
                              ((3 * x).detach().requires_grad_(), (3 * r).detach().requires_grad_(),
                               y, ry, partner, False, cosine, 0.5, 4.0, -float("inf"),
                               float("inf"), 2, True))


def test_compile():
    x = _unit(11, 4).double().requires_grad_()
    y = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 0])

    def f(e):
        return (gen_lifted_rows(e, e, y, y, True, False, 0.0, 1.0, 4).mean()
                + lifted_rows(e, e, y, y, True, False, 0.0, 1.0, chunk=4)[0].sum()
                + gen_lifted_rows_self(e, y, False, 0.0, 1.0, 4).sum()
                + lifted_rows_self(e, y, True, 0.0, 1.0, block=4)[0].sum())

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), f(x))
    torch.testing.assert_close(torch.autograd.grad(compiled(x), x)[0], torch.autograd.grad(f(x), x)[0])


BAD_GEN = [
    (lambda a: a.update(x=a["x"][0]), "x must be 2-D"),
    (lambda a: a.update(x=a["x"].long()), "x must be float32 or float64"),
    (lambda a: a.update(r=a["r"][:, :3]), "x and r must have the same D"),
    (lambda a: a.update(r=a["r"].double()), "x and r must have the same dtype"),
    (lambda a: a.update(labels=a["labels"][:-1]), r"labels must be int64 of shape \(9,\)"),
    (lambda a: a.update(ref_labels=a["ref_labels"].int()), r"ref_labels must be int64 of shape \(7,\)"),
    (lambda a: a.update(chunk=0), "chunk must be > 0"),
]


def _gen_args():
    return {"x": _unit(9, 5), "r": _unit(7, 5, 1), "labels": torch.tensor([0, 0, 1, 1, 2, 2, 2, 3, 3]),
            "ref_labels": torch.tensor([0, 1, 1, 2, 4, 4, 5])}


@pytest.mark.parametrize("k", range(len(BAD_GEN)))
def test_bad_op_inputs_name_the_argument(k):
    corrupt, msg = BAD_GEN[k]
    a = dict(_gen_args(), chunk=4)
    corrupt(a)
    op = torch.ops.metrix_ops
    with pytest.raises(RuntimeError, match=msg):
        op.gen_lifted_fwd(a["x"], a["r"], a["labels"], a["ref_labels"], False, False, 0.0, 1.0, a["chunk"])
    with pytest.raises(RuntimeError, match=msg):
        op.lifted_fwd(a["x"], a["r"], a["labels"], a["ref_labels"], torch.arange(7), False, False,
                      0.0, 1.0, 0.0, 1.0, a["chunk"])


def test_bad_lifted_inputs_name_the_argument():
    a = _gen_args()
    x, r, y, ry = a["x"], a["r"], a["labels"], a["ref_labels"]
    op = torch.ops.metrix_ops

    def fwd(partner=torch.arange(7), labels=y, ref_labels=ry):
        return op.lifted_fwd(x, r, labels, ref_labels, partner, False, False, 0.0, 1.0, 0.0, 1.0, 4)

    with pytest.raises(RuntimeError, match=r"partner must be of shape \(7,\)"):
        fwd(partner=torch.arange(6))
    with pytest.raises(RuntimeError, match="partner must be int64"):
        fwd(partner=torch.arange(7).int())
    with pytest.raises(RuntimeError, match=r"partner must be in \[-1, 9\)"):
        fwd(partner=torch.tensor([0, 1, 2, 3, 4, 5, 9]))
    with pytest.raises(RuntimeError, match="labels must be sorted"):
        fwd(labels=y.flip(0))
    with pytest.raises(RuntimeError, match="ref_labels must be sorted"):
        fwd(ref_labels=ry.flip(0))
    _, _, ln = fwd()
    with pytest.raises(RuntimeError, match=r"grad_sums must be of shape \(9,\)"):
        op.lifted_bwd(torch.ones(8), x, r, y, ry, torch.arange(7), ln, False, False, 0.0, 1.0, 0.0, 1.0, 4)
    with pytest.raises(RuntimeError, match=r"lse_neg must be of shape \(9,\)"):
        op.lifted_bwd(torch.ones(9), x, r, y, ry, torch.arange(7), ln[:3], False, False, 0.0, 1.0, 0.0, 1.0, 4)
    _, lp, ln = op.gen_lifted_fwd(x, r, y, ry, False, False, 0.0, 1.0, 4)
    with pytest.raises(RuntimeError, match=r"grad_rows must be of shape \(9,\)"):
        op.gen_lifted_bwd(torch.ones(10), x, r, y, ry, lp, ln, False, False, 0.0, 1.0, 4)
    with pytest.raises(RuntimeError, match=r"lse_pos must be of shape \(9,\)"):
        op.gen_lifted_bwd(torch.ones(9), x, r, y, ry, lp[:1], ln, False, False, 0.0, 1.0, 4)


def test_bad_self_op_inputs():
    a = _gen_args()
    x, y = a["x"], a["labels"]
    op = torch.ops.metrix_ops
    with pytest.raises(RuntimeError, match="labels must be sorted"):
        op.lifted_self_fwd(x, y.flip(0), False, 0.0, 1.0, 0.0, 1.0, 4)
    for bad, msg in (((x, y[:-1]), r"labels must be int64 of shape \(9,\)"), ((x[0], y), "x must be 2-D")):
        with pytest.raises(RuntimeError, match=msg):
            op.gen_lifted_self_fwd(*bad, False, 0.0, 1.0, 4)
        with pytest.raises(RuntimeError, match=msg):
            op.lifted_self_fwd(*bad, False, 0.0, 1.0, 0.0, 1.0, 4)
    with pytest.raises(RuntimeError, match="block must be > 0"):
        op.gen_lifted_self_fwd(x, y, False, 0.0, 1.0, 0)
    _, lp, ln = op.gen_lifted_self_fwd(x, y, False, 0.0, 1.0, 4)
    with pytest.raises(RuntimeError, match=r"lse_neg must be of shape \(9,\)"):
        op.gen_lifted_self_bwd(torch.ones(9), x, y, lp, ln[:2], False, 0.0, 1.0, 4)
    _, _, ln = op.lifted_self_fwd(x, y, False, 0.0, 1.0, 0.0, 1.0, 4)
    with pytest.raises(RuntimeError, match=r"grad_sums must be of shape \(9,\)"):
        op.lifted_self_bwd(torch.ones(3), x, y, ln, False, 0.0, 1.0, 0.0, 1.0, 4)


@pytest.mark.parametrize("name,kw", [("GeneralizedLiftedStructureLoss", {}),
                                     ("LiftedStructureLoss", {"reducer": mo.reducers.AvgNonZeroReducer()})])
def test_module_under_fullgraph_compile(name, kw):
    """As tests/test_module_compile.py: the modules on their fused path trace whole (pair
    counts, PML's no-pairs rule, the reducer) and match eager."""
    from test_module_compile import test_module_under_fullgraph_compile_equals_eager as check
    check(name, kw)


@pytest.mark.parametrize("name", NAMES)
def test_cross_batch_memory(name, op_calls):
    """CrossBatchMemory over fills and wrap-arounds equals PML. GeneralizedLifted streams the
    bank through the general op; Lifted's partner rows are indexed by unrolled bank slots,
    which the rolled bank of fused.run_with_memory hides: it keeps the listing path ('auto'),
    and backend='cpu' runs that path's index tuple on fused/indices/ (the partner rows by bank
    slot, as PML)."""
    from test_cross_batch_memory import _batches, _pair, _step
    backend = "cpu" if name == NAMES[0] else "auto"
    ours, theirs = _pair(name, 29, 6, backend=backend)
    theirs = theirs.double()
    for x, y in _batches([13, 17, 11, 15], 6, 5, seed=3):
        (va, ga), (vb, gb) = _step(ours, x, y), _step(theirs, x, y)
        torch.testing.assert_close(va, vb.to(va.dtype), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-9)
    assert op_calls == (["gen_lifted_rows"] * 4 if name == NAMES[0] else [])
    if name == NAMES[1]:
        cbm, ref = (mo.losses.CrossBatchMemory(mo.losses.LiftedStructureLoss(backend=b), 6,
                                               memory_size=29) for b in ("cpu", "reference"))
        for x, y in _batches([13, 17, 11, 15], 6, 5, seed=4):
            torch.testing.assert_close(cbm(x, y), ref(x, y))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dist", list(DISTANCES))
def test_matches_pml_directly(name, dist):
    from pytorch_metric_learning import distances as pd

    from cases import pml_pair
    g = torch.Generator().manual_seed(11)
    x = torch.randn(37, 12, dtype=torch.float64, generator=g)
    y = torch.randint(0, 7, (37,), generator=g)
    kw = {"neg_margin": 0.9, "pos_margin": 0.15}
    _, pml = pml_pair(name, kw, None if dist == "lp" else pd.CosineSimilarity)
    fused, _ = pair(name, DISTANCES[dist], **kw)
    assert_close_vg(lambda e: fused(e, y), lambda e: pml(e, y), x)


@pytest.mark.parametrize("name", NAMES)
def test_cosine_with_other_norm(name):
    """CosineSimilarity(p=1) normalises by the L1 norm (PML's BaseDistance): the fused path
    uses the distance's own normalisation, and a similarity of any rows is exact."""
    x, y = make_case(CASES[1])
    r = torch.randn(19, x.shape[1], dtype=torch.float64)
    ry = torch.randint(0, 6, (19,))
    fused, ref = pair(name, lambda: mo.distances.CosineSimilarity(p=1))
    assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x)
    assert_close_vg(lambda e, f: fused(e, y, ref_emb=f, ref_labels=ry),
                    lambda e, f: ref(e, y, ref_emb=f, ref_labels=ry), x, r)
