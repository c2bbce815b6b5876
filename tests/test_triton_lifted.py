"""The Triton LiftedStructureLoss (backend="triton", triton/lifted_structure.py: negative
log-sum-exps by the two-side kernel, then positive passes over each row tile's class runs)
against the reference: values and gradients over the shared cases, both distances and two
margin settings, shapes whose classes straddle several tiles, the reducers (windowed ones in
the op, others through the reference's pair losses), per-anchor sums with unequal weights,
fp32 and half inputs; what it does not cover; opcheck; sm_90 compilation.

Without a GPU these run under TRITON_INTERPRET=1 on CPU tensors."""

import pytest
import torch
import torch.nn.functional as F

import metrix_ops as mo
from cases import CASE_IDS, CASES, assert_close_vg, make_case, value_and_grad
from triton_cases import DEVICE, compiles_only, on_dev, requires_triton, run_sm90_script

pytestmark = requires_triton

DISTANCES = {"l2": lambda: mo.distances.LpDistance(), "cos": lambda: mo.distances.CosineSimilarity()}
SETTINGS = [{}, {"pos_margin": 0.3, "neg_margin": 0.6}]


def pair(dist="l2", **kw):
    return tuple(mo.losses.LiftedStructureLoss(backend=b, distance=DISTANCES[dist](), **kw)
                 for b in ("triton", "reference"))


@pytest.fixture
def op_calls(monkeypatch):
    import metrix_ops.triton.lifted_structure as tl_
    calls, real = [], tl_.lifted_rows_triton
    monkeypatch.setattr(tl_, "lifted_rows_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dist", DISTANCES)
@pytest.mark.parametrize("kw", SETTINGS)
def test_matches_reference_fp64(case, dist, kw):
    x, y = on_dev(*make_case(case))
    tri, ref = pair(dist, **kw)
    assert_close_vg(lambda e: tri(e, y), lambda e: ref(e, y), x)


@pytest.mark.parametrize("b,classes", [(2, 1), (17, 2), (50, 3), (70, 11)])
@pytest.mark.parametrize("dist", DISTANCES)
def test_odd_shapes_fp64(b, classes, dist, op_calls):
    """Classes of up to ~35 rows in tiles of 16 or 32: runs of positives that start and end
    inside tiles and cross their borders."""
    g = torch.Generator().manual_seed(10 * b + classes)
    x = torch.randn(b, 9, dtype=torch.float64, generator=g)
    y = torch.randint(0, classes, (b,), generator=g)
    x, y = on_dev(x, y)
    tri, ref = pair(dist)
    assert_close_vg(lambda e: tri(e, y), lambda e: ref(e, y), x)
    assert op_calls or classes == 1  # one class: PML's no-negatives rule, no op


class _OwnMean(mo.reducers.MeanReducer):
    """A reducer the op cannot express as a window (not exactly one of its types)."""


@pytest.mark.parametrize("red", ["sum", "avg_nonzero", "threshold", "own"])
def test_reducers(red, op_calls):
    reducer = {"sum": mo.reducers.SumReducer(), "avg_nonzero": mo.reducers.AvgNonZeroReducer(),
               "threshold": mo.reducers.ThresholdReducer(low=0.5, high=3.0),
               "own": _OwnMean()}[red]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 7, dtype=torch.float64, generator=g)
    y = torch.randint(0, 5, (40,), generator=g)
    x, y = on_dev(x, y)
    tri, ref = pair("l2", reducer=reducer, pos_margin=0.5)
    assert_close_vg(lambda e: tri(e, y), lambda e: ref(e, y), x)
    assert bool(op_calls) == (red != "own")  # the own reducer gets the reference's pair losses


@pytest.mark.parametrize("cosine", [False, True])
def test_rows_with_unequal_weights(cosine):
    """Every anchor's upstream gradient differs: the two orders of a positive pair carry
    different weights (c_ap + c_pa in G, g_a + g_p in the rows' lse⁻ weights)."""
    from metrix_ops.reference.lifted_structure import lifted_structure_loss_dict
    from metrix_ops.spec import LossInputs
    from metrix_ops.triton.lifted_structure import lifted_rows_triton
    g = torch.Generator().manual_seed(5 + cosine)
    b = 37
    x = torch.randn(b, 6, dtype=torch.float64, generator=g)
    y = torch.randint(0, 4, (b,), generator=g)
    w = torch.randn(b, dtype=torch.float64, generator=g)
    x, y, w = on_dev(x, y, w)
    dist = (mo.distances.CosineSimilarity(normalize_embeddings=False) if cosine
            else mo.distances.LpDistance(normalize_embeddings=False))
    pm, nm = (0.4, 0.2) if cosine else (0.3, 1.1)
    order = torch.argsort(y, stable=True)

    def ref_sums(e):
        e = F.normalize(e, dim=1)
        out = lifted_structure_loss_dict(LossInputs(e, y, None, e, y, True, dist), nm, pm)
        losses, (a1, _) = out["loss"]["losses"], out["loss"]["indices"]
        return torch.zeros(b, dtype=e.dtype, device=e.device).index_add(0, a1, losses)[order]

    def tri_sums(e):
        sums, counts = lifted_rows_triton(F.normalize(e, dim=1), y, cosine, pm, nm, None, None)
        return sums
    assert_close_vg(lambda e: (tri_sums(e) * w).sum(), lambda e: (ref_sums(e) * w).sum(), x)


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
    torch.testing.assert_close(gx.double(), gr, rtol=1e-4, atol=1e-4 * gr.abs().max().item())
    for half in (torch.float16, torch.bfloat16):
        h = x.detach().to(half).requires_grad_()
        v = tri(h, y)
        v.backward()
        assert torch.isfinite(h.grad).all()
        torch.testing.assert_close(v.float(), ref(h.detach().float(), y), rtol=2e-3, atol=1e-3)


def test_not_covered():
    """ref_emb (PML's partner-row quirk) and the squared L2 of unnormalised rows are not the
    Triton op's (their L2 is: test_triton_raw_l2.py): an explicit backend raises, "auto"
    runs another engine."""
    x, y = on_dev(*make_case(CASES[0]))
    with pytest.raises(NotImplementedError, match="does not cover"):
        mo.losses.LiftedStructureLoss(backend="triton")(x, y, ref_emb=x.detach() + 1, ref_labels=y)
    loss = mo.losses.LiftedStructureLoss(
        backend="triton", distance=mo.distances.LpDistance(normalize_embeddings=False, power=2))
    with pytest.raises(NotImplementedError, match="does not cover"):
        loss(x, y)


@pytest.mark.parametrize("cosine", [False, True])
def test_opcheck(cosine):
    x = F.normalize(torch.randn(11, 4, dtype=torch.float64), dim=1).to(DEVICE)
    y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4], device=DEVICE)
    lo = torch.searchsorted(y, y).int()
    hi = torch.searchsorted(y, y, right=True).int()
    ops = torch.ops.metrix_ops
    args = (cosine, 0.1, 0.9, 0.0, float("inf"))
    torch.library.opcheck(ops.triton_lifted_rows.default,
                          (x.clone().requires_grad_(), y, lo, hi) + args)
    _, _, lneg = ops.triton_lifted_rows(x, y, lo, hi, *args)
    gs = torch.randn(11, dtype=torch.float64, device=DEVICE)
    torch.library.opcheck(ops.triton_lifted_rows_bwd.default, (gs, x, y, lo, hi, lneg) + args)


_SM90 = r'''
import metrix_ops.triton.lifted_structure as ls

failed = []
for fdt, acc, prec, rows, width in [("fp32", tl.float32, "tf32", 32, 512),
                                    ("fp64", tl.float64, "ieee", 16, 128)]:
    for bwd in (False, True):
        for cos, raw in ((False, False), (True, False), (False, True)):
            consts = dict(BLOCK_M=rows, BLOCK_N=rows, BLOCK_D=64, ACC=acc, PRECISION=prec,
                          BLOCK_DO=width, BWD=bwd, COSINE=cos, RAW=raw)
            try:
                compile_sm90(ls._lifted_pos_kernel, consts, fdt,
                             num_warps=4 if width <= 128 else 8,
                             pointer_types={"lo_ptr": "*i32", "hi_ptr": "*i32",
                                            "cnt_ptr": "*i64"})
            except Exception as e:  # noqa: BLE001
                failed.append(f"bwd={bwd} cos={cos} raw={raw} {fdt}: {type(e).__name__}: "
                              f"{str(e)[:300]}")
print("\n".join(failed))
sys.exit(1 if failed else 0)
'''


@compiles_only
def test_kernels_compile_for_h100():
    run_sm90_script(_SM90)
