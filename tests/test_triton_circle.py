"""The Triton CircleLoss kernels (backend="triton") against the reference: values and
gradients over the shared cases and odd shapes spanning several tiles, two (m, γ) settings
(γ = 256 needs the online log-sum-exp), references (ref_emb, ref_labels), reducers, fp32 and
half inputs; the rows op with unequal weights; routing; opcheck; sm_90 compilation.

Without a GPU these run under TRITON_INTERPRET=1 on CPU tensors."""

import pytest
import torch
import torch.nn.functional as F

import metrix_ops as mo
from cases import CASE_IDS, CASES, assert_close_vg, make_case, value_and_grad
from triton_cases import DEVICE, compiles_only, on_dev, requires_triton, run_sm90_script

pytestmark = requires_triton

SETTINGS = [{}, {"m": 0.25, "gamma": 256.0}]


def pair(**kw):
    return (mo.losses.CircleLoss(backend="triton", **kw),
            mo.losses.CircleLoss(backend="reference", **kw))


@pytest.fixture
def op_calls(monkeypatch):
    import metrix_ops.triton.circle as tc
    calls, real = [], tc.circle_rows_triton
    monkeypatch.setattr(tc, "circle_rows_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("kw", SETTINGS)
def test_matches_reference_fp64(case, kw):
    x, y = on_dev(*make_case(case))
    tri, ref = pair(**kw)
    assert_close_vg(lambda e: tri(e, y), lambda e: ref(e, y), x)


@pytest.mark.parametrize("b", [2, 17, 50])
@pytest.mark.parametrize("d,classes", [(3, 2), (37, 11)])
def test_odd_shapes_fp64(b, d, classes, op_calls):
    g = torch.Generator().manual_seed(10 * b + d)
    x = torch.randn(b, d, dtype=torch.float64, generator=g)
    y = torch.randint(0, classes, (b,), generator=g)
    x, y = on_dev(x, y)
    tri, ref = pair()
    assert_close_vg(lambda e: tri(e, y), lambda e: ref(e, y), x)
    assert op_calls


def test_ref_emb_and_reducers():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(15, 8, dtype=torch.float64, generator=g)
    r = torch.randn(26, 8, dtype=torch.float64, generator=g)
    y, ry = torch.randint(0, 4, (15,), generator=g), torch.randint(0, 4, (26,), generator=g)
    x, r, y, ry = on_dev(x, r, y, ry)
    for red in (None, mo.reducers.SumReducer(), mo.reducers.ThresholdReducer(low=0.5, high=60.0)):
        tri, ref = pair(reducer=red)
        assert_close_vg(lambda e, f: tri(e, y, ref_emb=f, ref_labels=ry),
                        lambda e, f: ref(e, y, ref_emb=f, ref_labels=ry), x, r)
        assert_close_vg(lambda e, f: tri(e, y, ref_emb=f, ref_labels=y),
                        lambda e, f: ref(e, y, ref_emb=f, ref_labels=y), x, r[:15])


@pytest.mark.parametrize("b,m", [(23, 23), (40, 9)])
def test_rows_with_unequal_weights(b, m):
    """Every anchor's upstream gradient differs: G's row scaling in the dX and dR kernels,
    and (b = m) in the symmetric kernel."""
    from metrix_ops.reference.circle import circle_loss_dict
    from metrix_ops.spec import LossInputs
    from metrix_ops.triton.circle import circle_rows_triton
    g = torch.Generator().manual_seed(b + m)
    x = F.normalize(torch.randn(b, 6, dtype=torch.float64, generator=g), dim=1)
    r = F.normalize(torch.randn(m, 6, dtype=torch.float64, generator=g), dim=1)
    y, ry = torch.randint(0, 4, (b,), generator=g), torch.randint(0, 4, (m,), generator=g)
    w = torch.randn(b, dtype=torch.float64, generator=g)
    x, r, y, ry, w = on_dev(x, r, y, ry, w)

    def ref_rows(e, f, yy, ryy, same):
        inp = LossInputs(e, yy, None, f, ryy, same,
                         mo.distances.CosineSimilarity(normalize_embeddings=False))
        return circle_loss_dict(inp, 0.25, 256.0)["loss"]["losses"]
    assert_close_vg(lambda e, f: (circle_rows_triton(e, f, y, ry, False, 0.25, 256.0) * w).sum(),
                    lambda e, f: (ref_rows(e, f, y, ry, False) * w).sum(), x, r)
    if b == m:
        assert_close_vg(lambda e: (circle_rows_triton(e, e, y, y, True, 0.25, 256.0) * w).sum(),
                        lambda e: (ref_rows(e, e, y, y, True) * w).sum(), x)


def test_fp32_and_half_inputs():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(45, 20, generator=g)
    y = torch.randint(0, 6, (45,), generator=g)
    x, y = on_dev(x, y)
    tri, ref = pair()
    v, (gx,) = value_and_grad(lambda e: tri(e, y), x)
    vr, (gr,) = value_and_grad(lambda e: ref(e, y), x.double())
    assert v.dtype == torch.float32 and gx.dtype == torch.float32
    torch.testing.assert_close(v.double(), vr, rtol=1e-4, atol=1e-7)
    # γ multiplies fp32's error in s: compare against the gradient's scale
    assert (gx.double() - gr).abs().max().item() <= 1e-4 * gr.abs().max().item()
    h = x.detach().half().requires_grad_()
    v = tri(h, y)
    v.backward()
    assert v.dtype == torch.float32 and torch.isfinite(h.grad).all()
    torch.testing.assert_close(v, ref(h.detach().float(), y), rtol=1e-3, atol=1e-4)


def test_not_covered_and_auto(monkeypatch):
    x, y = on_dev(*make_case(CASES[0]))
    with pytest.raises(NotImplementedError, match="does not cover"):
        mo.losses.CircleLoss(backend="triton", distance=mo.distances.LpDistance())(x, y)


def test_opcheck():
    """The shared two-side log-sum-exp ops (triton/side_lse.py) of Circle's kind."""
    from metrix_ops.triton.circle import CIRCLE
    x = F.normalize(torch.randn(11, 4, dtype=torch.float64), dim=1).to(DEVICE)
    r = F.normalize(torch.randn(7, 4, dtype=torch.float64), dim=1).to(DEVICE)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 0], device=DEVICE)
    ry = torch.tensor([0, 1, 1, 2, 3, 5, 0], device=DEVICE)
    consts = [256.0, 1.25, -0.25, 0.75, 0.25]
    check_side_lse_ops(x, r, y, ry, CIRCLE, consts)


def check_side_lse_ops(x, r, y, ry, kind, consts, raw=False):
    """opcheck of the forward op (general and symmetric) and of its backward op (raw: rows
    of any norm; else the raw argument is left to its default)."""
    ops = torch.ops.metrix_ops
    extra = (True,) if raw else ()
    torch.library.opcheck(ops.triton_side_lse_rows.default,
                          (x.clone().requires_grad_(), r.clone().requires_grad_(), y, ry, False,
                           kind, consts, False) + extra)
    xs = x.clone().requires_grad_()
    torch.library.opcheck(ops.triton_side_lse_rows.default, (xs, xs, y, y, True, kind, consts,
                                                             True) + extra)
    z, lp, ln = ops.triton_side_lse_rows(x, x, y, y, True, kind, consts, True, raw)
    gz = torch.randn(x.shape[0], dtype=x.dtype, device=x.device)
    for sym, need in ((False, (True, True)), (True, (True, False))):
        torch.library.opcheck(ops.triton_side_lse_rows_bwd.default,
                              (gz, x, x, y, y, lp, ln, True, kind, consts, sym, raw) + need)


_SM90 = r'''
import metrix_ops.triton.circle as ci
import metrix_ops.triton.pairs as pairs
import metrix_ops.triton.side_lse as side

failed = []
for fdt, acc, prec, rows, width in [("fp32", tl.float32, "tf32", 32, 512),
                                    ("fp64", tl.float64, "ieee", 16, 512)]:
    tiles = dict(BLOCK_M=rows, BLOCK_N=rows, BLOCK_D=64, ACC=acc, PRECISION=prec)
    grad = dict(tiles, BLOCK_DO=width, GRAD_TILE=ci._circle_grad_tile)
    fwd = dict(tiles, EXCLUDE_DIAG=True, LOGITS=ci._circle_logits, EMPTY_ZERO=False)
    for fn, consts in [(side.side_lse_fwd_kernel, fwd),
                       (pairs.pair_grad_dx_kernel, dict(grad, EXCLUDE_DIAG=True)),
                       (pairs.pair_grad_dr_kernel, dict(grad, EXCLUDE_DIAG=False)),
                       (pairs.pair_grad_sym_kernel, grad)]:
        consts = {k: v for k, v in consts.items() if k in fn.arg_names}
        try:
            compile_sm90(fn, consts, fdt, num_warps=4 if width <= 128 else 8)
        except Exception as e:  # noqa: BLE001
            failed.append(f"{fn.__name__} {fdt} D{width}: {type(e).__name__}: {str(e)[:300]}")
print("\n".join(failed))
sys.exit(1 if failed else 0)
'''


@compiles_only
def test_kernels_compile_for_h100():
    run_sm90_script(_SM90)
