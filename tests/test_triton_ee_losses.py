"""Embedding Expansion for MultiSimilarityLoss, LiftedStructureLoss,
GeneralizedLiftedStructureLoss, NPairsLoss (triton/ee_neg_lse.py) and TripletMarginLoss
(triton/ee_triplet.py, the same kernels' MODE 1) on the Triton engine: the ops against the CPU
engine's C++ ops (values and gradients, anchor and negative masks,
duplicates, antipodal segments), the losses against the reference (shared edge cases, n,
pairs, distances, reducers, fp32 and half inputs), routing, opcheck, sm_90 compilation.

Without a GPU these run under TRITON_INTERPRET=1 on CPU tensors."""
import pytest
import torch
import torch.nn.functional as F

import ee_losses_checks as checks
import metrix_ops as mo
from cases import CASES, CASE_IDS, assert_close_vg
from metrix_ops import _ext
from metrix_ops.ops.ee_mining import all_segments
from test_fused_hphn_cpu import batch
from triton_cases import compiles_only, on_dev, requires_triton, run_sm90_script

pytestmark = requires_triton

LOSSES = checks.LOSSES


def lse_triton(*args):
    from metrix_ops.triton.ee_neg_lse import ee_neg_lse_triton
    return ee_neg_lse_triton(*args)


# ---------------------------------------------------------------- the op against the C++ op
@pytest.mark.skipif(not _ext.HAS_EXT, reason="extension not built")
@pytest.mark.parametrize("n", [0, 2])
@pytest.mark.parametrize("l2", [False, True])
def test_op_equals_cpu_op(n, l2):
    from metrix_ops.ops.ee_losses import ee_neg_lse
    x, y = batch(27, 6, 5, seed=3 + n)
    x[4] = x[2] if y[4] == y[2] else x[4]
    x[9] = -x[10]  # an antipodal pair
    xu = F.normalize(x.detach(), dim=1)
    si, sj = all_segments(y)
    g = torch.Generator().manual_seed(n)
    amask = torch.rand(27, generator=g) > 0.2
    nmask = torch.rand(27, generator=g) > 0.3
    w = torch.randn(27, dtype=torch.float64, generator=g)
    for masks in ((None, None), (amask, nmask)):
        want = ee_neg_lse(xu.requires_grad_(), y, si, sj, n, l2, 3.0, -0.7, *masks)
        gw = torch.autograd.grad(torch.where(torch.isfinite(want), want * w, 0).sum(), xu)[0]
        xd, yd = on_dev(xu.detach(), y)
        xd.requires_grad_()
        got = lse_triton(xd, yd, *on_dev(si, sj), n, l2, 3.0, -0.7,
                         *(None if m is None else on_dev(m)[0] for m in masks))
        wd = on_dev(w)[0]
        gg = torch.autograd.grad(torch.where(torch.isfinite(got), got * wd, 0).sum(), xd)[0]
        torch.testing.assert_close(got.cpu(), want.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gg.cpu(), gw, rtol=1e-9, atol=1e-11)


@pytest.mark.skipif(not _ext.HAS_EXT, reason="extension not built")
@pytest.mark.parametrize("n", [0, 2])
@pytest.mark.parametrize("l2", [False, True])
@pytest.mark.parametrize("smooth", [False, True])
def test_triplet_op_equals_cpu_op(n, l2, smooth):
    """(Σ f, #f > 0, #triplets) per anchor and the gradients into x and the positives' metrics,
    on a batch with a duplicate row, an antipodal pair and a singleton class (no positive)."""
    from metrix_ops.fused.ee_losses import _positive_pairs
    from metrix_ops.ops.ee_losses import ee_triplet
    from metrix_ops.triton.ee_triplet import ee_triplet_triton
    x, y = batch(23, 6, 4, seed=5 + n)
    y[7] = 99  # a class of one: no positive, no triplet, still a negative of the others
    x[4] = x[2] if y[4] == y[2] else x[4]
    x[9] = -x[10]
    xu = F.normalize(x.detach(), dim=1)
    si, sj = all_segments(y)
    a, p = _positive_pairs(y)
    pos = (xu[a] * xu[p]).sum(1) if not l2 else (xu[a] - xu[p]).norm(dim=1)
    w = torch.randn(23, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    xu.requires_grad_(), pos.requires_grad_()
    want = ee_triplet(xu, y, si, sj, pos, n, l2, 0.3, smooth)
    gw = torch.autograd.grad((want[0] * w).sum(), (xu, pos))
    xd, yd, posd, wd = on_dev(xu, y, pos, w)
    got = ee_triplet_triton(xd, yd, *on_dev(si, sj), posd, n, l2, 0.3, smooth)
    gg = torch.autograd.grad((got[0] * wd).sum(), (xd, posd))
    torch.testing.assert_close(got[0].cpu(), want[0].detach(), rtol=1e-10, atol=1e-11)
    assert torch.equal(got[1].cpu(), want[1]) and torch.equal(got[2].cpu(), want[2])
    assert int(want[2][7]) == 0 and int(want[2].sum()) > 0
    for g_got, g_want in zip(gg, gw):
        torch.testing.assert_close(g_got.cpu(), g_want, rtol=1e-9, atol=1e-11)


def test_triplet_smooth_keeps_tiny_terms_float32():
    """softplus of v ≈ −17 (a margin of −17): log1p-exact terms and counts in fp32, as the C++
    op's log1p(exp(v)); a plain log(1 + e^v) would round them to 0."""
    from metrix_ops.fused.ee_losses import _positive_pairs
    from metrix_ops.ops.ee_losses import ee_triplet
    from metrix_ops.triton.ee_triplet import ee_triplet_triton
    x, y = batch(12, 4, 3, seed=9)
    xu = F.normalize(x.detach(), dim=1).float()
    si, sj = all_segments(y)
    a, p = _positive_pairs(y)
    pos = (xu[a] * xu[p]).sum(1)
    want = ee_triplet(xu, y, si, sj, pos, 2, False, -17.0, True)
    got = ee_triplet_triton(*on_dev(xu, y, si, sj, pos), 2, False, -17.0, True)
    assert bool((want[0] > 0).all())
    torch.testing.assert_close(got[0].cpu(), want[0], rtol=2e-6, atol=0)
    assert torch.equal(got[1].cpu(), want[1]) and torch.equal(got[2].cpu(), want[2])


def test_triplet_op_checks_pos():
    from metrix_ops.triton.ee_triplet import ee_triplet_triton
    x, y = on_dev(*batch(9, 4, 3, seed=1))
    si, sj = all_segments(y)
    with pytest.raises(ValueError, match="pos must have shape"):
        ee_triplet_triton(F.normalize(x, dim=1), y, si, sj, x[:3, 0], 2, False, 0.1, False)


# ---------------------------------------------------------------- the losses
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_shared_cases_float64(name, case):
    checks.check_shared_case("triton", on_dev, name, case)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("n,pairs", [(1, "all"), (3, "adjacent")])
def test_distances_and_pairs(name, n, pairs):
    checks.check_distances_and_pairs("triton", on_dev, name, n, pairs)


@pytest.mark.parametrize("name", sorted(checks.HYPER))
def test_reducers_and_hyper_parameters(name):
    checks.check_reducers_and_hyper_parameters("triton", on_dev, name)


def test_multi_class_chunks():
    """Classes of 1–20 rows: chunks of several small classes, KB = 32, segments spanning
    several point tiles."""
    checks.check_labels("triton", on_dev, torch.tensor([0] * 20 + [1] * 3 + [2] + [3] * 9
                                                       + [4] * 2))


@pytest.mark.parametrize("name", LOSSES)
def test_adjacent_pairs_take_a_class_over_the_whole_class_limit(name, monkeypatch):
    """pairs="adjacent" (the official pairing): a chunk keeps pairs of rows whole, not
    classes, so a class of 70 rows (over EE_MAX_CLASS) is cut across chunks and the op runs
    (no fallback), equal to the reference in values and gradients."""
    from metrix_ops.triton import ee_neg_lse as neg
    calls = []
    real = neg.unit_chunks
    monkeypatch.setattr(neg, "unit_chunks", lambda *a: calls.append(1) or real(*a))
    y = torch.tensor([0] * 70 + [1] * 4 + [2] * 2 + [3] * 6)  # class-contiguous, even classes
    x, _ = batch(len(y), 5, 1, seed=12)
    x, y = on_dev(x, y)
    eng, ref = checks.pair("triton", name, 2, "adjacent")
    # (TripletMarginLoss: 69 positives per anchor of the big class, two blocks of KP_MAX)
    assert_close_vg(lambda e: eng(e, y), lambda e: ref(e, y), x)
    assert calls


@pytest.mark.parametrize("name", LOSSES)
def test_float32_and_half(name):
    checks.check_float32_and_half("triton", on_dev, name)


# ---------------------------------------------------------------- routing
def test_routing(monkeypatch):
    import metrix_ops.triton.ee_losses as tel
    calls = []
    real = tel.ee_neg_lse_triton
    for name in LOSSES:
        sup, impl = mo.fused.EXPANSION_IMPLS[("triton", name)]
        monkeypatch.setitem(mo.fused.EXPANSION_IMPLS, ("triton", name),
                            (sup, lambda *a, _i=impl, **k: calls.append(1) or _i(*a, **k)))
    x, y = on_dev(*batch(12, 4, 3, seed=1))
    for name in LOSSES:
        getattr(mo.losses, name)(backend="triton", expansion=mo.Expansion(n_points=2))(x, y)
    assert len(calls) == len(LOSSES) and real is not None
    # a class of more than 64 rows is not covered: explicit triton raises, auto runs another
    big = torch.tensor([0] * 65 + [1] * 3)
    xb = on_dev(torch.randn(68, 4, dtype=torch.float64))[0]
    yb = on_dev(big)[0]
    with pytest.raises(NotImplementedError):
        mo.losses.MultiSimilarityLoss(backend="triton", expansion=mo.Expansion(n_points=1))(xb, yb)
    ref = mo.losses.MultiSimilarityLoss(backend="reference", expansion=mo.Expansion(n_points=1))
    torch.testing.assert_close(
        mo.losses.MultiSimilarityLoss(expansion=mo.Expansion(n_points=1))(xb, yb), ref(xb, yb))
    # unnormalised synthetic points with L2 are not a function of cosines: not covered
    tri = mo.losses.LiftedStructureLoss(backend="triton",
                                        expansion=mo.Expansion(n_points=2, normalize=False))
    with pytest.raises(NotImplementedError):
        tri(x, y)


def test_opcheck():
    from metrix_ops.triton.segment_norms import segment_norms_triton
    x, y = batch(11, 4, 3, seed=2)
    xu = F.normalize(x.detach(), dim=1)
    si, sj = all_segments(y)
    xu, y, si, sj = on_dev(xu, y, si, sj)
    order = torch.argsort(y, stable=True)
    pos = torch.empty_like(order)
    pos[order] = torch.arange(11, device=y.device)
    ones = torch.ones(11, dtype=torch.bool, device=y.device)
    xs = xu[order].contiguous().requires_grad_()
    layout = [y[order], pos[si], pos[sj], ones, ones]
    pnorm = segment_norms_triton(xs.detach(), pos[si], pos[sj], 2).requires_grad_()
    counts = torch.bincount(y)[y] - 1
    pst = (torch.cumsum(counts, 0) - counts)[order].to(torch.int32)
    pct = counts[order].to(torch.int32)
    pv = torch.rand(int(counts.sum()), dtype=xs.dtype, device=xs.device).requires_grad_()
    for l2 in (False, True):
        torch.library.opcheck(torch.ops.metrix_ops.triton_ee_neg_lse_fwd.default,
                              (xs, pnorm, layout, 2, l2, 2.0, -0.5))
        torch.library.opcheck(torch.ops.metrix_ops.triton_ee_triplet_fwd.default,
                              (xs, pnorm, pv, layout, pst, pct, 2, l2, 0.2, not l2))


_SM90 = r'''
import metrix_ops.triton.ee_neg_lse as m

failed = []
ints = ["chunk_ptr", "cls_ptr", "pstart_ptr", "pu_ptr", "pw_ptr", "pp_ptr", "soff_ptr",
        "su_ptr", "sw_ptr", "sp_ptr", "pst_ptr", "pct_ptr"]
ptrs = dict({k: "*i32" for k in ints}, amask_ptr="*i8", pok_ptr="*i8", pl_ptr="*fp64",
            sl_ptr="*fp64", nz_ptr="*i64", ct_ptr="*i64")
for fdt, acc, prec in [("fp32", tl.float32, "tf32"), ("fp64", tl.float64, "ieee")]:
    for l2, mode in ((False, {}), (True, {}), (False, dict(MODE=1, SMOOTH=True, KP=64)),
                     (True, dict(MODE=1, KP=16))):
        base = dict(L2=l2, KB=16, BA=64, BLOCK_D=64, ACC=acc, PRECISION=prec, **mode)
        for kernel, extra in ((m._fwd_kernel, dict(BQ=32)),
                              (m._bwd_kernel, dict(BQ=16, BLOCK_DO=512))):
            try:
                compile_sm90(kernel, dict(base, **extra), fdt, pointer_types=ptrs)
            except Exception as e:  # noqa: BLE001
                failed.append(f"{kernel.__name__} {fdt} l2={l2} {mode}: {type(e).__name__}: "
                              f"{str(e)[:300]}")
print("\n".join(failed))
sys.exit(1 if failed else 0)
'''


@compiles_only
def test_kernels_compile_for_h100():
    run_sm90_script(_SM90)
