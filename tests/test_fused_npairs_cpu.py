"""NPairsLoss on the CPU backend (PML's pair choice from the labels, then the fused ProxyNCA
op over the kept anchors against the kept positives) against the reference: values and
gradients over odd shapes and label layouts, distances, reducers, dtypes, large logits;
the pair choice against the reference's, fallbacks, and that backend="auto" runs the op."""
import pytest
import torch

import metrix_ops as mo
import metrix_ops.fused.npairs as fnp
from cases import CASE_IDS, CASES, assert_close_vg, make_case, value_and_grad
from metrix_ops import _ext
from metrix_ops.reference.npairs import unique_label_pos_pairs
from test_fused_lifted_cpu import LAYOUTS, layout_case

pytestmark = pytest.mark.skipif(not _ext.HAS_EXT, reason="extension not built")

DISTANCES = [None, mo.distances.CosineSimilarity,
             lambda: mo.distances.DotProductSimilarity(normalize_embeddings=False),
             lambda: mo.distances.DotProductSimilarity(p=1)]  # L1-normalised rows


def pair(dist=None, **kw):
    if dist is not None:
        kw["distance"] = dist()
    return mo.losses.NPairsLoss(backend="cpu", **kw), mo.losses.NPairsLoss(backend="reference", **kw)


@pytest.fixture
def op_calls(monkeypatch):
    calls, real = [], fnp.proxy_nca_rows
    monkeypatch.setattr(fnp, "proxy_nca_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("d", [3, 16, 37])
@pytest.mark.parametrize("b", [1, 2, 5, 17, 33, 64])
def test_matches_reference_fp64(b, d, layout):
    x, y = layout_case(b, d, layout)
    for dist in DISTANCES:
        fused, ref = pair(dist)
        assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_shared_cases(case):
    x, y = make_case(case)
    fused, ref = pair()
    assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x)


@pytest.mark.parametrize("seed", range(6))
def test_pair_choice_is_pmls(seed):
    g = torch.Generator().manual_seed(seed)
    b = int(torch.randint(1, 60, (1,), generator=g))
    y = torch.randint(-3, 1 + b // 3, (b,), generator=g) * (2 ** 40 if seed % 2 else 1)
    a, p = fnp.first_pairs(y)
    ra, rp = unique_label_pos_pairs(None, y)
    assert torch.equal(a, ra) and torch.equal(p, rp)


REDUCERS = [mo.reducers.MeanReducer, mo.reducers.SumReducer, mo.reducers.AvgNonZeroReducer,
            lambda: mo.reducers.ThresholdReducer(low=0.5, high=3.0)]


@pytest.mark.parametrize("red", range(len(REDUCERS)))
def test_reducers(red, op_calls):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(41, 16, dtype=torch.float64, generator=g)
    y = torch.randint(0, 12, (41,), generator=g)
    fused, ref = pair(reducer=REDUCERS[red]())
    assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x)
    assert op_calls


def test_fp32_and_half_inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(67, 24, generator=g)
    y = torch.randint(0, 20, (67,), generator=g)
    fused, ref = pair()
    v, (gx,) = value_and_grad(lambda e: fused(e, y), x)
    vr, (gr,) = value_and_grad(lambda e: ref(e.double(), y), x.double())
    assert v.dtype == gx.dtype == torch.float32
    torch.testing.assert_close(v.double(), vr, rtol=1e-4, atol=0)
    torch.testing.assert_close(gx.double(), gr, rtol=1e-4, atol=1e-4 * gr.abs().max())
    for dtype, tol in ((torch.float16, 2e-3), (torch.bfloat16, 1e-2)):
        xl = x.to(dtype).requires_grad_(True)
        out = fused(xl, y)
        out.backward()
        assert out.dtype == torch.float32 and xl.grad.dtype == dtype
        assert torch.isfinite(xl.grad).all()
        want = ref(xl.detach().double(), y)
        assert abs(float(out.detach()) - float(want)) <= tol * abs(float(want))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_logits_do_not_overflow(dtype):
    """Raw dot products of long vectors (logits in the thousands) stay finite."""
    g = torch.Generator().manual_seed(4)
    x = 30 * torch.randn(24, 10, generator=g, dtype=torch.float64)
    y = torch.randint(0, 6, (24,), generator=g)
    fused, ref = pair(DISTANCES[2])  # raw dot products
    v, (gx,) = value_and_grad(lambda e: fused(e, y), x.to(dtype))
    vr, (gr,) = value_and_grad(lambda e: ref(e, y), x)
    assert torch.isfinite(v) and torch.isfinite(gx).all() and vr > 100
    rtol = 1e-6 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(v.double(), vr, rtol=rtol, atol=0)
    torch.testing.assert_close(gx.double(), gr, rtol=rtol, atol=rtol * gr.abs().max())


def test_auto_runs_the_op(op_calls):
    x, y = make_case(CASES[1])
    torch.testing.assert_close(mo.losses.NPairsLoss(backend="auto")(x, y),
                               mo.losses.NPairsLoss(backend="reference")(x, y))
    assert op_calls == [1]


def test_outside_scope_falls_back_or_refuses(op_calls):
    x, y = make_case(CASES[1])
    it = mo.miners.MultiSimilarityMiner()(x, y)
    lp = mo.distances.LpDistance()
    # an indices_tuple: fused/indices/ (not this op, which op_calls spies on)
    torch.testing.assert_close(mo.losses.NPairsLoss(backend="cpu")(x, y, it),
                               mo.losses.NPairsLoss(backend="reference")(x, y, it))
    for call in (lambda l: l.__class__(distance=lp, backend=l.backend)(x, y),):
        torch.testing.assert_close(call(mo.losses.NPairsLoss(backend="auto")),
                                   call(mo.losses.NPairsLoss(backend="reference")))
        with pytest.raises(NotImplementedError, match="does not cover this NPairsLoss call"):
            call(mo.losses.NPairsLoss(backend="cpu"))
    assert not op_calls
    with pytest.raises(ValueError, match="does not take ref_emb"):
        mo.losses.NPairsLoss(backend="cpu")(x, y, ref_emb=x.clone(), ref_labels=y)



def test_a_reference_set_is_not_covered():
    """NPairsLoss takes no ref_emb (the driver refuses it); a bank handed in as references
    (fused.run_with_memory's LossInputs) must not be silently dropped by the fused path."""
    from metrix_ops.spec import LossInputs
    x, y = make_case(CASES[1])
    dist = mo.distances.DotProductSimilarity()
    assert fnp.supports({}, LossInputs(x, y, None, x, y, True, dist), None)
    assert not fnp.supports({}, LossInputs(x, y, None, x.clone(), y, True, dist), None)


def test_matches_pml_directly():
    from cases import pml_pair
    g = torch.Generator().manual_seed(11)
    x = torch.randn(37, 12, dtype=torch.float64, generator=g)
    y = torch.randint(0, 9, (37,), generator=g)
    _, pml = pml_pair("NPairsLoss")
    assert_close_vg(lambda e: mo.losses.NPairsLoss(backend="cpu")(e, y), lambda e: pml(e, y), x)
