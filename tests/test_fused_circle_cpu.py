"""The fused CPU CircleLoss op against the reference (which matches PML): values and gradients
w.r.t. embeddings and ref_emb over odd shapes, label layouts, chunk sizes, reducers, dtypes
and γ up to 256; opcheck, bad input, backend choice.

CircleLoss's weights are detached by definition, so its gradient is not the derivative of its
value: gradcheck does not apply, and the op's gradient is checked against the reference's."""
import pytest
import torch
import torch.nn.functional as F

import metrix_ops as mo
import metrix_ops.fused.circle as fused_circle
import metrix_ops.ops.circle as circle_ops
from cases import CASE_IDS, CASES, assert_close_vg, make_case, value_and_grad
from metrix_ops import _ext
from test_fused_ntxent_cpu import REDUCERS, data

pytestmark = pytest.mark.skipif(not _ext.HAS_EXT, reason="extension not built")

HYPER = [{}, {"m": 0.25, "gamma": 64.0}, {"m": 0.1, "gamma": 256.0}]


def pair(**kw):
    return mo.losses.CircleLoss(backend="cpu", **kw), mo.losses.CircleLoss(backend="reference", **kw)


@pytest.fixture
def chunk(request, monkeypatch):
    """The general op's row chunks and the self op's blocks (the batch against itself)."""
    if request.param is not None:
        monkeypatch.setattr(circle_ops, "default_chunk", lambda n: request.param)
        monkeypatch.setattr(fused_circle, "SELF_BLOCK", request.param)
    return request.param


@pytest.mark.parametrize("chunk", [1, 7, None], indirect=True)
@pytest.mark.parametrize("layout,dup", [("random", False), ("random", True), ("no_positives", False),
                                        ("one_class", False), ("singletons", True)])
@pytest.mark.parametrize("B,D", [(1, 3), (2, 16), (5, 37), (17, 3), (33, 16), (64, 37)])
def test_matches_reference_fp64(B, D, layout, dup, chunk):
    x, y = data(B, D, layout, seed=B * 100 + D + 1, dup=dup)
    fused, ref = pair()
    assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_shared_cases_and_hyper_parameters(case):
    x, y = make_case(case)
    for kw in HYPER:
        fused, ref = pair(**kw)
        assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x)


@pytest.mark.parametrize("red", list(REDUCERS))
def test_reducers(red):
    for seed, (B, D) in enumerate([(33, 16), (17, 3), (64, 37)]):
        x, y = data(B, D, seed=seed + 50, dup=True)
        y[0] = 999  # an anchor without positives: a zero term
        for kw in HYPER[:2]:
            reducer = (mo.reducers.ThresholdReducer(low=5.0, high=60.0) if red == "threshold"
                       else REDUCERS[red]())
            fused, ref = pair(reducer=reducer, **kw)
            assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x)


@pytest.mark.parametrize("chunk", [3, None], indirect=True)
@pytest.mark.parametrize("red", [None, "mean"])
def test_ref_emb(red, chunk):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(17, 16, dtype=torch.float64, generator=g)
    r = torch.randn(26, 16, dtype=torch.float64, generator=g)
    y, ry = torch.randint(0, 4, (17,), generator=g), torch.randint(0, 4, (26,), generator=g)
    kw = {} if red is None else {"reducer": REDUCERS[red]()}
    fused, ref = pair(**kw)
    assert_close_vg(lambda e, f: fused(e, y, ref_emb=f, ref_labels=ry),
                    lambda e, f: ref(e, y, ref_emb=f, ref_labels=ry), x, r)
    assert_close_vg(lambda e: fused(e, y, ref_emb=e, ref_labels=y.clone()),
                    lambda e: ref(e, y, ref_emb=e, ref_labels=y.clone()), x)
    for ry2 in (ry + 10, torch.full_like(ry, 2)):  # no positive at all / no negative at all
        y2 = torch.full_like(y, 2)
        assert_close_vg(lambda e, f: fused(e, y2, ref_emb=f, ref_labels=ry2),
                        lambda e, f: ref(e, y2, ref_emb=f, ref_labels=ry2), x, r)


@pytest.mark.parametrize("gamma", [80.0, 256.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_large_gamma_no_overflow(gamma, dtype):
    """γ = 80..256: logits up to γ·2.4·1.6 ≈ 300..980, e^· far past fp32's (and at 256 fp64's)
    range; near-duplicates put s ≈ 1 on both sides."""
    x, y = data(64, 16, seed=6, dup=True)
    x[10] = x[11] + 1e-3 * x[12]
    x[20] = -x[21]  # s = −1
    fused, ref = pair(gamma=gamma)
    v, (gx,) = value_and_grad(lambda e: fused(e, y), x.to(dtype))
    assert torch.isfinite(v) and torch.isfinite(gx).all()
    vr, (gxr,) = value_and_grad(lambda e: ref(e, y), x.to(dtype))
    rtol = 1e-6 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(v, vr, rtol=rtol, atol=0)
    torch.testing.assert_close(gx, gxr, rtol=rtol, atol=rtol * gxr.abs().max())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_low_precision(dtype, tol):
    x, y = data(40, 16, seed=3)
    fused, ref = pair()
    xl = x.to(dtype).requires_grad_(True)
    out = fused(xl, y)
    out.backward()
    assert out.dtype == torch.float32 and torch.isfinite(out)
    assert xl.grad.dtype == dtype and torch.isfinite(xl.grad).all()
    torch.testing.assert_close(out.detach(), ref(xl.detach().float(), y), rtol=1e-5, atol=1e-6)
    ref64 = ref(x, y)
    assert abs(float(out.detach()) - float(ref64)) <= tol * abs(float(ref64))


def test_fp32_gradients_match_fp64_reference():
    x, y = data(64, 37, seed=8)
    r = torch.randn(50, 37, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ry = torch.randint(0, 20, (50,), generator=torch.Generator().manual_seed(2))
    fused, ref = pair()
    v, g = value_and_grad(lambda e, f: fused(e, y, ref_emb=f, ref_labels=ry), x.float(), r.float())
    vr, gr = value_and_grad(lambda e, f: ref(e, y, ref_emb=f, ref_labels=ry), x, r)
    torch.testing.assert_close(v.double(), vr, rtol=1e-4, atol=0)
    for a, b in zip(g, gr):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4 * b.abs().max())


def test_op_rows_and_chunks():
    from metrix_ops.ops.circle import circle_rows
    from metrix_ops.reference.circle import circle_loss_dict
    from metrix_ops.spec import LossInputs
    g = torch.Generator().manual_seed(12)
    x = F.normalize(torch.randn(13, 5, dtype=torch.float64, generator=g), dim=1)
    r = F.normalize(torch.randn(9, 5, dtype=torch.float64, generator=g), dim=1)
    y, ry = torch.randint(0, 3, (13,), generator=g), torch.randint(0, 3, (9,), generator=g)
    y[0] = 7  # no positive: 0
    inp = LossInputs(x, y, None, r, ry, False, mo.distances.CosineSimilarity())
    want = circle_loss_dict(inp)["loss"]["losses"]
    assert want[0] == 0 and (want[1:] > 0).any()
    for c in (1, 2, 5, 100):
        torch.testing.assert_close(circle_rows(x, r, y, ry, False, 0.4, 80.0, c), want,
                                   rtol=1e-12, atol=1e-12)


def test_self_op_rows_and_blocks():
    """The self op's rows against the reference's, for blocks from one row to all; the
    duplicates and a class of one exercise ties and an empty positive side."""
    from metrix_ops.ops.circle import circle_rows_self
    from metrix_ops.reference.circle import circle_loss_dict
    from metrix_ops.spec import LossInputs
    g = torch.Generator().manual_seed(15)
    x = F.normalize(torch.randn(19, 6, dtype=torch.float64, generator=g), dim=1)
    x[5] = x[2]
    y = torch.randint(0, 4, (19,), generator=g)
    y[0] = 9  # no positive: 0
    inp = LossInputs(x, y, None, x, y, True, mo.distances.CosineSimilarity())
    want = circle_loss_dict(inp)["loss"]["losses"]
    assert want[0] == 0 and (want[1:] > 0).any()
    for b in (1, 2, 5, 19, 100):
        torch.testing.assert_close(circle_rows_self(x, y, 0.4, 80.0, b), want,
                                   rtol=1e-12, atol=1e-12)


def test_opcheck_and_compile():
    g = torch.Generator().manual_seed(13)
    x = F.normalize(torch.randn(9, 5, generator=g), dim=1).requires_grad_()
    r = F.normalize(torch.randn(7, 5, generator=g), dim=1).requires_grad_()
    y, ry = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3, 3]), torch.tensor([0, 1, 1, 2, 4, 3, 3])
    torch.library.opcheck(torch.ops.metrix_ops.circle_fwd.default,
                          (x, r, y, ry, False, 0.4, 80.0, 4))
    torch.library.opcheck(torch.ops.metrix_ops.circle_fwd.default,
                          (x, x.detach().clone().requires_grad_(), y, y, True, 0.25, 64.0, 2))
    torch.library.opcheck(torch.ops.metrix_ops.circle_self_fwd.default, (x, y, 0.25, 64.0, 4))
    xd, yd = data(21, 8, seed=14)
    fused, ref = pair()
    compiled = torch.compile(lambda e: fused(e, yd), fullgraph=True, backend="eager")
    assert_close_vg(compiled, lambda e: ref(e, yd), xd)


def test_auto_calls_the_op(monkeypatch):
    """The batch against itself takes the symmetric self op, references the general one."""
    assert mo.backend.resolve("auto", "CircleLoss", torch.device("cpu")) == "cpu"
    calls = []
    for name in ("circle_fwd", "circle_self_fwd"):
        real = getattr(torch.ops.metrix_ops, name)
        monkeypatch.setattr(torch.ops.metrix_ops, name,
                            lambda *a, n=name, r=real: calls.append(n) or r(*a))
    x, y = data(12, 5, seed=17)
    out = mo.losses.CircleLoss(backend="auto")(x, y)
    assert calls == ["circle_self_fwd"]
    torch.testing.assert_close(out, pair()[1](x, y))
    r, ry = data(7, 5, seed=18)
    out = mo.losses.CircleLoss(backend="auto")(x, y, ref_emb=r, ref_labels=ry)
    assert calls == ["circle_self_fwd", "circle_fwd"]
    torch.testing.assert_close(out, pair()[1](x, y, ref_emb=r, ref_labels=ry))


def test_falls_back_or_refuses_outside_its_scope():
    from pytorch_metric_learning import distances as pd
    x, y = make_case(CASES[1])
    it = mo.miners.MultiSimilarityMiner()(x, y)
    auto, ref = mo.losses.CircleLoss(backend="auto"), mo.losses.CircleLoss(backend="reference")
    torch.testing.assert_close(auto(x, y, it), ref(x, y, it))
    torch.testing.assert_close(mo.losses.CircleLoss(backend="cpu")(x, y, it), ref(x, y, it))  # an indices_tuple: fused/indices/
    raw = mo.distances.CosineSimilarity(normalize_embeddings=False)
    torch.testing.assert_close(mo.losses.CircleLoss(backend="auto", distance=raw)(x, y),
                               mo.losses.CircleLoss(backend="reference", distance=raw)(x, y))
    with pytest.raises(ValueError, match="CosineSimilarity"):  # the reference's refusal
        mo.losses.CircleLoss(backend="auto", distance=pd.LpDistance())(x, y)


def test_bad_input_raises_clearly():
    x, y = data(6, 4, seed=19, dtype=torch.float32)
    r, ry = x[:5], y[:5]
    fwd = torch.ops.metrix_ops.circle_fwd
    with pytest.raises(RuntimeError, match="x must be 2-D"):
        fwd(x[0], r, y, ry, False, 0.4, 80.0, 2)
    with pytest.raises(RuntimeError, match="same D"):
        fwd(x, r[:, :3], y, ry, False, 0.4, 80.0, 2)
    with pytest.raises(RuntimeError, match=r"ref_labels must be int64 of shape \(5,\)"):
        fwd(x, r, y, y, False, 0.4, 80.0, 2)
    with pytest.raises(RuntimeError, match="chunk must be > 0"):
        fwd(x, r, y, ry, False, 0.4, 80.0, -1)
    with pytest.raises(RuntimeError, match=r"labels must be int64 of shape \(6,\)"):
        torch.ops.metrix_ops.circle_self_fwd(x, y[:5], 0.4, 80.0, 2)
    with pytest.raises(RuntimeError, match="block"):
        torch.ops.metrix_ops.circle_self_fwd(x, y, 0.4, 80.0, 0)
    with pytest.raises(RuntimeError, match=r"lse_pos must be of shape \(6,\)"):
        torch.ops.metrix_ops.circle_self_bwd(torch.ones(6), x, y, torch.ones(5), torch.ones(6),
                                             0.4, 80.0, 2)
    with pytest.raises(RuntimeError, match=r"lse_neg must be of shape \(6,\)"):
        torch.ops.metrix_ops.circle_bwd(torch.ones(6), x, r, y, ry, torch.ones(6), torch.ones(5),
                                        False, 0.4, 80.0, 2, True)
