"""MultiSimilarityLoss with miner=MultiSimilarityMiner on the Triton engine (triton/ms_mined.py:
the anchors' hardest pairs, then the loss over the kept pairs, the miner's masks in the
shared gradient kernels) against PML's two calls `loss(x, y, miner(x, y))`: values and
gradients over the shared cases and ε settings, odd shapes over several tiles, ref_emb
(both gradients), reducers, PML's miner given to the loss, the kept-pair counts, fp32 and
half inputs; opcheck; sm_90 compilation.

Without a GPU these run under TRITON_INTERPRET=1 on CPU tensors."""
import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pl
from pytorch_metric_learning import miners as pm
from pytorch_metric_learning import reducers as pr

import metrix_ops as mo
from cases import CASE_IDS, CASES, assert_close_vg, make_case, value_and_grad
from metrix_ops import fused
from triton_cases import DEVICE, compiles_only, on_dev, requires_triton, run_sm90_script

pytestmark = requires_triton


def pml_mined(loss, miner):
    return lambda e, y, *ref: loss(e, y, miner(e, y, *ref), *ref)


@pytest.fixture
def op_calls(monkeypatch):
    calls = []
    supports, impl = fused.MINER_IMPLS[("triton", "MultiSimilarityLoss")]
    monkeypatch.setitem(fused.MINER_IMPLS, ("triton", "MultiSimilarityLoss"),
                        (supports, lambda *a: calls.append(1) or impl(*a)))
    return calls


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("eps", [0.1, 0.0, 0.5])
def test_matches_pml(case, eps, op_calls):
    x, y = on_dev(*make_case(case))
    ours = mo.losses.MultiSimilarityLoss(backend="triton", miner=mo.miners.MultiSimilarityMiner(eps))
    theirs = pml_mined(pl.MultiSimilarityLoss(), pm.MultiSimilarityMiner(eps))
    assert_close_vg(lambda e: ours(e, y), lambda e: theirs(e, y), x)
    assert op_calls


@pytest.mark.parametrize("b,classes", [(17, 3), (50, 7), (70, 2)])
def test_odd_shapes_and_settings(b, classes, op_calls):
    g = torch.Generator().manual_seed(b)
    x = torch.randn(b, 13, dtype=torch.float64, generator=g)
    y = torch.randint(0, classes, (b,), generator=g)
    x, y = on_dev(x, y)
    kw = {"alpha": 1.5, "beta": 30.0, "base": 0.3}
    ours = mo.losses.MultiSimilarityLoss(backend="triton", miner=pm.MultiSimilarityMiner(0.2), **kw)
    theirs = pml_mined(pl.MultiSimilarityLoss(**kw), pm.MultiSimilarityMiner(0.2))
    assert_close_vg(lambda e: ours(e, y), lambda e: theirs(e, y), x)
    assert op_calls


def test_ref_emb_both_gradients(op_calls):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(21, 9, dtype=torch.float64, generator=g)
    r = torch.randn(34, 9, dtype=torch.float64, generator=g)
    y, ry = torch.randint(0, 4, (21,), generator=g), torch.randint(0, 4, (34,), generator=g)
    x, r, y, ry = on_dev(x, r, y, ry)
    ours = mo.losses.MultiSimilarityLoss(backend="triton", miner=mo.miners.MultiSimilarityMiner(0.1))
    theirs = pml_mined(pl.MultiSimilarityLoss(), pm.MultiSimilarityMiner(0.1))
    assert_close_vg(lambda e, f: ours(e, y, ref_emb=f, ref_labels=ry),
                    lambda e, f: theirs(e, y, f, ry), x, r)
    assert op_calls


@pytest.mark.parametrize("reducer", ["MeanReducer", "SumReducer", "AvgNonZeroReducer"])
def test_reducers(reducer):
    x, y = on_dev(*make_case(CASES[1]))
    ours = mo.losses.MultiSimilarityLoss(backend="triton", miner=pm.MultiSimilarityMiner(0.1),
                                         reducer=getattr(mo.reducers, reducer)())
    theirs = pml_mined(pl.MultiSimilarityLoss(reducer=getattr(pr, reducer)()),
                       pm.MultiSimilarityMiner(0.1))
    assert_close_vg(lambda e: ours(e, y), lambda e: theirs(e, y), x)


def test_kept_counts_equal_the_miners_pairs():
    """The op's kept (positive, negative) pairs per anchor are the pairs the miner returns."""
    from metrix_ops.triton.ms_mined import ms_mined_rows_triton
    g = torch.Generator().manual_seed(8)
    x = F.normalize(torch.randn(40, 6, dtype=torch.float64, generator=g), dim=1)
    y = torch.randint(0, 5, (40,), generator=g)
    x, y = on_dev(x, y)
    for eps in (0.05, 0.3):
        _, kept = ms_mined_rows_triton(x, x, y, y, True, 2.0, 50.0, 0.5, eps)
        a1, _, a2, _ = pm.MultiSimilarityMiner(eps)(x, y)
        assert torch.equal(kept[:, 0], torch.bincount(a1, minlength=40))
        assert torch.equal(kept[:, 1], torch.bincount(a2, minlength=40))
        assert 0 < int(kept.sum()) < 40 * 39  # selective: some pairs dropped, some kept


def test_fp32_and_half_inputs():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(45, 20, generator=g)
    y = torch.randint(0, 6, (45,), generator=g)
    x, y = on_dev(x, y)
    ours = mo.losses.MultiSimilarityLoss(backend="triton", miner=mo.miners.MultiSimilarityMiner(0.1))
    ref = mo.losses.MultiSimilarityLoss(backend="reference")
    miner = mo.miners.MultiSimilarityMiner(0.1)
    v, (gx,) = value_and_grad(lambda e: ours(e, y), x)
    vr, (gr,) = value_and_grad(lambda e: ref(e, y, miner(e, y)), x)
    assert v.dtype == torch.float32
    torch.testing.assert_close(v, vr, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gx, gr, rtol=1e-4, atol=1e-5 * gr.abs().max().item())
    h = x.detach().half().requires_grad_()
    v = ours(h, y)
    v.backward()
    assert v.dtype == torch.float32 and torch.isfinite(h.grad).all()


def test_opcheck():
    x = F.normalize(torch.randn(11, 4, dtype=torch.float64), dim=1).to(DEVICE)
    r = F.normalize(torch.randn(7, 4, dtype=torch.float64), dim=1).to(DEVICE)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 0], device=DEVICE)
    ry = torch.tensor([0, 1, 1, 2, 3, 5, 0], device=DEVICE)
    ops = torch.ops.metrix_ops
    consts = (2.0, 50.0, 0.5, 0.3)
    torch.library.opcheck(ops.triton_ms_mined_rows.default,
                          (x.clone().requires_grad_(), r.clone().requires_grad_(), y, ry, False)
                          + consts + (False,))
    xs = x.clone().requires_grad_()
    torch.library.opcheck(ops.triton_ms_mined_rows.default, (xs, xs, y, y, True) + consts + (True,))
    _, lp, ln, _, hn, hp = ops.triton_ms_mined_rows(x, x, y, y, True, *consts, True)
    gr = torch.randn(11, dtype=torch.float64, device=DEVICE)
    for sym, need in ((False, (True, True)), (True, (True, False))):
        torch.library.opcheck(ops.triton_ms_mined_rows_bwd.default,
                              (gr, x, x, y, y, lp, ln, hn, hp, True) + consts + (sym,) + need)


_SM90 = r'''
import metrix_ops.triton.ms_mined as mm
import metrix_ops.triton.multi_similarity as ms
import metrix_ops.triton.pairs as pairs

failed = []
for fdt, acc, prec, rows, width in [("fp32", tl.float32, "tf32", 32, 512),
                                    ("fp64", tl.float64, "ieee", 16, 128)]:
    tiles = dict(BLOCK_M=rows, BLOCK_N=rows, BLOCK_D=64, ACC=acc, PRECISION=prec)
    grad = dict(tiles, BLOCK_DO=width, GRAD_TILE=ms._ms_grad_tile, MINE=True)
    for fn, consts in [(mm._ms_bounds_kernel, dict(tiles, EXCLUDE_DIAG=True)),
                       (ms._ms_fwd_kernel, dict(tiles, EXCLUDE_DIAG=True, MINE=True)),
                       (pairs.pair_grad_dx_kernel, dict(grad, EXCLUDE_DIAG=False)),
                       (pairs.pair_grad_dr_kernel, dict(grad, EXCLUDE_DIAG=False)),
                       (pairs.pair_grad_sym_kernel, grad)]:
        consts = {k: v for k, v in consts.items() if k in fn.arg_names}
        try:
            compile_sm90(fn, consts, fdt, num_warps=4 if width <= 128 else 8,
                         pointer_types={"kept_ptr": "*i64"})
        except Exception as e:  # noqa: BLE001
            failed.append(f"{fn.__name__} {fdt}: {type(e).__name__}: {str(e)[:300]}")
print("\n".join(failed))
sys.exit(1 if failed else 0)
'''


@compiles_only
def test_kernels_compile_for_h100():
    run_sm90_script(_SM90)
