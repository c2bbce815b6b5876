"""The Triton GeneralizedLiftedStructureLoss (backend="triton", the two-side log-sum-exp
kernels of triton/side_lse.py) against the reference: values and gradients over the shared
cases and odd shapes spanning several tiles, both distances (normalised L2, cosine) and two
margin settings, references (ref_emb, ref_labels), reducers, fp32 and half inputs; the rows
op with unequal weights; routing; opcheck; sm_90 compilation.

Without a GPU these run under TRITON_INTERPRET=1 on CPU tensors."""

import pytest
import torch
import torch.nn.functional as F

import metrix_ops as mo
from cases import CASE_IDS, CASES, assert_close_vg, make_case, value_and_grad
from test_triton_circle import check_side_lse_ops
from triton_cases import DEVICE, compiles_only, on_dev, requires_triton, run_sm90_script

pytestmark = requires_triton

DISTANCES = {"l2": lambda: mo.distances.LpDistance(), "cos": lambda: mo.distances.CosineSimilarity()}
SETTINGS = [{}, {"pos_margin": 0.3, "neg_margin": 0.6}]


def pair(dist="l2", **kw):
    return tuple(mo.losses.GeneralizedLiftedStructureLoss(backend=b, distance=DISTANCES[dist](),
                                                          **kw)
                 for b in ("triton", "reference"))


@pytest.fixture
def op_calls(monkeypatch):
    import metrix_ops.triton.generalized_lifted as tg
    calls, real = [], tg.lifted_side_rows
    monkeypatch.setattr(tg, "lifted_side_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dist", DISTANCES)
@pytest.mark.parametrize("kw", SETTINGS)
def test_matches_reference_fp64(case, dist, kw):
    x, y = on_dev(*make_case(case))
    tri, ref = pair(dist, **kw)
    assert_close_vg(lambda e: tri(e, y), lambda e: ref(e, y), x)


@pytest.mark.parametrize("b", [2, 17, 50])
@pytest.mark.parametrize("d,classes", [(3, 2), (37, 11)])
@pytest.mark.parametrize("dist", DISTANCES)
def test_odd_shapes_fp64(b, d, classes, dist, op_calls):
    g = torch.Generator().manual_seed(10 * b + d)
    x = torch.randn(b, d, dtype=torch.float64, generator=g)
    y = torch.randint(0, classes, (b,), generator=g)
    x, y = on_dev(x, y)
    tri, ref = pair(dist)
    assert_close_vg(lambda e: tri(e, y), lambda e: ref(e, y), x)
    assert op_calls


def test_duplicates_l2_no_nan():
    """Duplicate rows: d = 0 within a class (slope 0, as cdist's backward), no NaN."""
    g = torch.Generator().manual_seed(4)
    base = torch.randn(5, 6, dtype=torch.float64, generator=g)
    x = base[[0, 0, 1, 1, 2, 3, 3, 4, 4]].clone()
    y = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0, 0])
    x, y = on_dev(x, y)
    tri, ref = pair("l2", pos_margin=0.1)
    v, (gx,) = value_and_grad(lambda e: tri(e, y), x)
    assert torch.isfinite(gx).all()
    assert_close_vg(lambda e: tri(e, y), lambda e: ref(e, y), x)


@pytest.mark.parametrize("dist", DISTANCES)
def test_ref_emb_and_reducers(dist):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(15, 8, dtype=torch.float64, generator=g)
    r = torch.randn(26, 8, dtype=torch.float64, generator=g)
    y, ry = torch.randint(0, 4, (15,), generator=g), torch.randint(0, 4, (26,), generator=g)
    x, r, y, ry = on_dev(x, r, y, ry)
    for red in (None, mo.reducers.SumReducer(), mo.reducers.ThresholdReducer(low=0.5, high=3.0),
                mo.reducers.AvgNonZeroReducer()):
        tri, ref = pair(dist, reducer=red)
        assert_close_vg(lambda e, f: tri(e, y, ref_emb=f, ref_labels=ry),
                        lambda e, f: ref(e, y, ref_emb=f, ref_labels=ry), x, r)
        assert_close_vg(lambda e, f: tri(e, y, ref_emb=f, ref_labels=y),
                        lambda e, f: ref(e, y, ref_emb=f, ref_labels=y), x, r[:15])


@pytest.mark.parametrize("b,m", [(23, 23), (40, 9)])
@pytest.mark.parametrize("cosine", [False, True])
def test_rows_with_unequal_weights(b, m, cosine):
    """Every anchor's upstream gradient differs (and some anchors sit on the hinge's flat
    side): G's row scaling in the dX and dR kernels, and (b = m) in the symmetric kernel."""
    from metrix_ops.reference.generalized_lifted_structure import (
        generalized_lifted_structure_loss_dict)
    from metrix_ops.spec import LossInputs
    from metrix_ops.triton.generalized_lifted import lifted_side_rows
    g = torch.Generator().manual_seed(b + m)
    x = F.normalize(torch.randn(b, 6, dtype=torch.float64, generator=g), dim=1)
    r = F.normalize(torch.randn(m, 6, dtype=torch.float64, generator=g), dim=1)
    y, ry = torch.randint(0, 4, (b,), generator=g), torch.randint(0, 4, (m,), generator=g)
    w = torch.randn(b, dtype=torch.float64, generator=g)
    x, r, y, ry, w = on_dev(x, r, y, ry, w)
    dist = (mo.distances.CosineSimilarity(normalize_embeddings=False) if cosine
            else mo.distances.LpDistance(normalize_embeddings=False))
    pm, nm = (0.4, 0.2) if cosine else (0.3, 1.1)

    # the rows op differentiates through s only: compare on the sphere (through F.normalize,
    # as the losses call it), where L2's radial part of cdist's gradient is projected out
    def ref_rows(e, f, yy, ryy, same):
        e, f = F.normalize(e, dim=1), (None if same else F.normalize(f, dim=1))
        inp = LossInputs(e, yy, None, e if same else f, ryy, same, dist)
        return generalized_lifted_structure_loss_dict(inp, nm, pm)["loss"]["losses"]

    def tri_rows(e, f, yy, ryy, same):
        e, f = F.normalize(e, dim=1), (None if same else F.normalize(f, dim=1))
        return torch.relu(lifted_side_rows(e, e if same else f, yy, ryy, same, cosine, pm,
                                           nm)[0])
    assert_close_vg(lambda e, f: (tri_rows(e, f, y, ry, False) * w).sum(),
                    lambda e, f: (ref_rows(e, f, y, ry, False) * w).sum(), x, r)
    if b == m:
        assert_close_vg(lambda e: (tri_rows(e, None, y, y, True) * w).sum(),
                        lambda e: (ref_rows(e, None, y, y, True) * w).sum(), x)


@pytest.mark.parametrize("dist", DISTANCES)
def test_fp32_and_half_inputs(dist):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(45, 20, generator=g)
    y = torch.randint(0, 6, (45,), generator=g)
    x, y = on_dev(x, y)
    tri, ref = pair(dist)
    v, (gx,) = value_and_grad(lambda e: tri(e, y), x)
    vr, (gr,) = value_and_grad(lambda e: ref(e, y), x.double())
    assert v.dtype == torch.float32 and gx.dtype == torch.float32
    torch.testing.assert_close(v.double(), vr, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(gx.double(), gr, rtol=1e-4, atol=1e-4 * gr.abs().max().item())
    for half in (torch.float16, torch.bfloat16):
        h = x.detach().to(half).requires_grad_()
        v = tri(h, y)
        v.backward()
        assert v.dtype == torch.float32 and torch.isfinite(h.grad).all()
        torch.testing.assert_close(v, ref(h.detach().float(), y), rtol=1e-3, atol=1e-4)


def test_not_covered():
    x, y = on_dev(*make_case(CASES[0]))
    loss = mo.losses.GeneralizedLiftedStructureLoss(
        backend="triton", distance=mo.distances.LpDistance(p=1))
    with pytest.raises(NotImplementedError, match="does not cover"):
        loss(x, y)


@pytest.mark.parametrize("cosine", [False, True])
def test_opcheck(cosine):
    from metrix_ops.triton.generalized_lifted import GEN_LIFTED_COS, GEN_LIFTED_L2
    x = F.normalize(torch.randn(11, 4, dtype=torch.float64), dim=1).to(DEVICE)
    r = F.normalize(torch.randn(7, 4, dtype=torch.float64), dim=1).to(DEVICE)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 0], device=DEVICE)
    ry = torch.tensor([0, 1, 1, 2, 3, 5, 0], device=DEVICE)
    consts = [0.1, 0.9, 8 * torch.finfo(torch.float64).eps]
    check_side_lse_ops(x, r, y, ry, GEN_LIFTED_COS if cosine else GEN_LIFTED_L2, consts)


_SM90 = r'''
import metrix_ops.triton.generalized_lifted as gl
import metrix_ops.triton.pairs as pairs
import metrix_ops.triton.side_lse as side

failed = []
for fdt, acc, prec, rows, width in [("fp32", tl.float32, "tf32", 32, 512),
                                    ("fp64", tl.float64, "ieee", 16, 128)]:
    tiles = dict(BLOCK_M=rows, BLOCK_N=rows, BLOCK_D=64, ACC=acc, PRECISION=prec)
    # (the L2 kernels also in their RAW form, rows of any norm)
    for logits, grad_tile, raw in [(gl._lifted_logits_cos, gl._lifted_grad_tile_cos, False),
                                   (gl._lifted_logits_l2, gl._lifted_grad_tile_l2, False),
                                   (gl._lifted_logits_l2, gl._lifted_grad_tile_l2, True)]:
        grad = dict(tiles, BLOCK_DO=width, GRAD_TILE=grad_tile, RAW=raw)
        fwd = dict(tiles, EXCLUDE_DIAG=False, LOGITS=logits, EMPTY_ZERO=True, RAW=raw)
        for fn, consts in [(side.side_lse_fwd_kernel, fwd), (pairs.pair_grad_sym_kernel, grad)]:
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
