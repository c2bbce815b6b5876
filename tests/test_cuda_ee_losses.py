"""backend="cuda" for MultiSimilarityLoss, LiftedStructureLoss, GeneralizedLiftedStructureLoss,
NPairsLoss and TripletMarginLoss with Embedding Expansion (csrc/cuda/ee_losses_cuda.cu, the CPU
ops' schemas ee_neg_lse_* / ee_triplet_*): the ops against the CPU ops (values and gradients,
anchor and negative masks, duplicates, antipodal rows, a class of one, chunks of 3 rows to
whole batches, classes over the Triton engine's 64 rows, n above a point tile's warp),
determinism, the losses against the reference (shared edge cases, n, pairs, distances,
reducers, fp32 and half), routing, opcheck, bad input. Skipped without a GPU and the compiled
CUDA kernels."""
import pytest
import torch
import torch.nn.functional as F

import ee_losses_checks as checks
import metrix_ops as mo
from cases import CASES, CASE_IDS, value_and_grad
from cuda_emu.plugin import emulating
from metrix_ops import _ext
from metrix_ops.ops.ee_mining import all_segments
from metrix_ops.reference.expansion_points import expansion_segments
from test_fused_hphn_cpu import batch

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and _ext.HAS_CUDA_EXT),
                                reason="needs a CUDA device and the compiled CUDA kernels")

LOSSES = checks.LOSSES


@pytest.fixture(autouse=True)
def _fp32_products(no_tf32):  # conftest.py
    pass


def _cuda(*ts):
    """Leaves on the GPU (t.cuda() of a leaf that requires grad is not a leaf)."""
    return [t.detach().cuda().requires_grad_(t.requires_grad) for t in ts]


def odd_batch(b, d, classes, seed, big=0, adjacent=False):
    """(unit rows, labels, dup): a duplicated pair of rows of one class (dup), an antipodal
    pair of different classes, a class of one (unless adjacent) and (big) a class of `big`
    rows; adjacent: rows 2t, 2t+1 share a label."""
    x, y = batch(b, d, classes, seed=seed)
    if big:
        y[:big] = classes + 1
    y[-1] = classes + 7  # a class of one: no positive, still a negative of the others
    if adjacent:
        b -= b % 2
        x, y = x[:b], y[:b].clone()
        y[1::2] = y[0::2]
    same = (y == y[2]).nonzero().flatten()
    dup = (2, int(same[same != 2][0])) if len(same) > 1 else None
    if dup:
        x[dup[1]] = x[2]
    # antipodal rows of different classes (within a class, the mix at λ = ½ has a norm ~0 that
    # the reference clamps: its gradient then hangs on the last bit of the Gram entries)
    x[(y != y[5]).nonzero()[0, 0]] = -x[5]
    return F.normalize(x, dim=1), y, dup


def fold_dup(g, dup):
    """The gradient with the duplicated rows' summed into the first: their points coincide,
    which of them wins ŝ hangs on the last bit of each engine's products, and any split of
    the gradient between the duplicates is a valid subgradient (the sum is not)."""
    if dup is None:
        return g
    g = g.clone()
    g[dup[0]] += g[dup[1]]
    g[dup[1]] = 0
    return g


# ---------------------------------------------------------------- the ops against the CPU ops
@pytest.mark.parametrize("n", [0, 2, 9])
@pytest.mark.parametrize("l2", [False, True])
@pytest.mark.parametrize("chunk", [3, 512])
@pytest.mark.parametrize("pairs", ["all", "adjacent"])
def test_neg_lse_equals_cpu_op(n, l2, chunk, pairs):
    from metrix_ops.ops.ee_losses import ee_neg_lse
    big = 70 if chunk == 512 else 0
    xu, y, dup = odd_batch(40 + big, 6, 5, seed=n + chunk, big=big,
                           adjacent=pairs == "adjacent")
    si, sj = expansion_segments(y, "adjacent") if pairs == "adjacent" else all_segments(y)
    b = len(y)
    g = torch.Generator().manual_seed(n)
    w = torch.randn(b, dtype=torch.float64, generator=g)
    masks = (torch.rand(b, generator=g) > 0.2, torch.rand(b, generator=g) > 0.3)
    for am, nm in ((None, None), masks):
        x = xu.detach().clone().requires_grad_()
        want = ee_neg_lse(x, y, si, sj, n, l2, 3.0, -0.7, am, nm, chunk)
        gw = torch.autograd.grad(torch.where(torch.isfinite(want), want * w, 0).sum(), x)[0]
        xd, yd, sid, sjd, wd = _cuda(x, y, si, sj, w)
        md = [None if m is None else m.cuda() for m in (am, nm)]
        got = ee_neg_lse(xd, yd, sid, sjd, n, l2, 3.0, -0.7, *md, chunk)
        gg = torch.autograd.grad(torch.where(torch.isfinite(got), got * wd, 0).sum(), xd)[0]
        torch.testing.assert_close(got.cpu(), want.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(fold_dup(gg.cpu(), dup), fold_dup(gw, dup), rtol=1e-9,
                                   atol=1e-11)


# n = 9 with the 70-row class (512-row chunks) is a minute each on the emulator: there
# l2 and smooth are taken together, (False, False) and (True, True); on a GPU all four
TRIPLET_CASES = [(n, l2, smooth, chunk) for chunk in (3, 512) for smooth in (False, True)
                 for l2 in (False, True) for n in (0, 2, 9)
                 if not (emulating() and n == 9 and chunk == 512 and l2 != smooth)]


@pytest.mark.parametrize("n,l2,smooth,chunk", TRIPLET_CASES)
def test_triplet_equals_cpu_op(n, l2, smooth, chunk):
    """(Σ f, #f > 0, #triplets) per anchor and the gradients into x and the positives'
    metrics."""
    from metrix_ops.fused.ee_losses import _positive_pairs
    from metrix_ops.ops.ee_losses import ee_triplet
    big = 70 if chunk == 512 else 0
    xu, y, dup = odd_batch(37 + big, 6, 4, seed=5 + n, big=big)
    si, sj = all_segments(y)
    a, p = _positive_pairs(y)
    pos = (xu[a] * xu[p]).sum(1) if not l2 else (xu[a] - xu[p]).norm(dim=1)
    b = len(y)
    w = torch.randn(b, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    x, pos = xu.detach().requires_grad_(), pos.detach().requires_grad_()
    want = ee_triplet(x, y, si, sj, pos, n, l2, 0.3, smooth, chunk)
    gw = torch.autograd.grad((want[0] * w).sum(), (x, pos))
    xd, yd, sid, sjd, posd, wd = _cuda(x, y, si, sj, pos, w)
    got = ee_triplet(xd, yd, sid, sjd, posd, n, l2, 0.3, smooth, chunk)
    gg = torch.autograd.grad((got[0] * wd).sum(), (xd, posd))
    torch.testing.assert_close(got[0].cpu(), want[0].detach(), rtol=1e-10, atol=1e-11)
    assert torch.equal(got[1].cpu(), want[1]) and torch.equal(got[2].cpu(), want[2])
    assert int(want[2][-1]) == 0 and int(want[2].sum()) > 0
    torch.testing.assert_close(fold_dup(gg[0].cpu(), dup), fold_dup(gw[0], dup), rtol=1e-9,
                               atol=1e-11)
    torch.testing.assert_close(gg[1].cpu(), gw[1], rtol=1e-9, atol=1e-11)  # ∂pos: no tie


def test_empty_batch():
    """B = 0: the ops return empty per-anchor outputs; the losses the reference's zero."""
    from metrix_ops.ops.ee_losses import ee_neg_lse, ee_triplet
    x = torch.zeros(0, 5, dtype=torch.float64, device="cuda", requires_grad=True)
    y = torch.zeros(0, dtype=torch.long, device="cuda")
    lse = ee_neg_lse(x, y, y, y, 2, False, 1.0, 0.0)
    assert lse.shape == (0,)
    assert torch.autograd.grad(lse.sum(), x)[0].shape == (0, 5)
    sums, nz, ct = ee_triplet(x, y, y, y, x.new_zeros(0), 2, True, 0.1, False)
    assert sums.shape == nz.shape == ct.shape == (0,)
    for name in LOSSES:
        cu, ref = checks.pair("cuda", name, 2)
        torch.testing.assert_close(cu(x, y), ref(x, y))


def test_float32_ops_and_determinism():
    """fp32 against the CPU op, and two backward passes bit for bit (no atomics)."""
    from metrix_ops.ops.ee_losses import ee_neg_lse
    xu, y, dup = odd_batch(300, 16, 40, seed=4, big=80)
    si, sj = all_segments(y)
    x = xu.float().requires_grad_()
    want = ee_neg_lse(x, y, si, sj, 3, True, -2.0, 1.0)
    gw = torch.autograd.grad(want.sum(), x)[0]
    xd, yd, sid, sjd = _cuda(x, y, si, sj)
    grads = []
    for _ in range(2):
        got = ee_neg_lse(xd, yd, sid, sjd, 3, True, -2.0, 1.0, chunk=64)
        grads.append(torch.autograd.grad(got.sum(), xd)[0])
    torch.testing.assert_close(got.cpu(), want.detach(), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(fold_dup(grads[0].cpu(), dup), fold_dup(gw, dup), rtol=2e-4,
                               atol=2e-5)
    assert torch.equal(grads[0], grads[1])


# ---------------------------------------------------------------- the losses
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_shared_cases_float64(name, case):
    checks.check_shared_case("cuda", _cuda, name, case)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("n,pairs", [(1, "all"), (3, "adjacent"), (10, "all")])
def test_distances_and_pairs(name, n, pairs, monkeypatch):
    import metrix_ops.fused.cuda_ee_losses as cel
    monkeypatch.setattr(cel, "GPU_CHUNK", 7)  # several chunk pairs and point tiles
    checks.check_distances_and_pairs("cuda", _cuda, name, n, pairs)


@pytest.mark.parametrize("name", sorted(checks.HYPER))
def test_reducers_and_hyper_parameters(name):
    checks.check_reducers_and_hyper_parameters("cuda", _cuda, name)


@pytest.mark.parametrize("name", LOSSES)
def test_class_over_64_rows(name):
    """What the Triton engine does not cover: a class of 70 rows."""
    checks.check_labels("cuda", _cuda, torch.tensor([0] * 70 + [1] * 3 + [2] * 2 + [3]),
                        name=name)


@pytest.mark.parametrize("name", LOSSES)
def test_float32_and_half(name):
    checks.check_float32_and_half("cuda", _cuda, name)


@pytest.mark.parametrize("name", LOSSES)
def test_fullgraph_compile_equals_eager(name):
    """The glue traces whole around the CUDA ops (their fake kernels), as on the CPU
    (test_module_compile.py); "adjacent" pairs of different labels fail in the op."""
    torch._dynamo.reset()
    loss = getattr(mo.losses, name)(backend="cuda", expansion=mo.Expansion(n_points=2))
    compiled = torch.compile(lambda e, l: loss(e, l), fullgraph=True, dynamic=False)
    g = torch.Generator().manual_seed(3)
    # random, no positives, B = 1 (no pair at all), one class (no negative)
    for b, k in [(13, 4), (6, 6), (1, 1), (8, 1)]:
        x, y = _cuda(torch.randn(b, 7, generator=g, dtype=torch.float64),
                     torch.randint(0, k, (b,), generator=g))
        va, (ga,) = value_and_grad(lambda e: compiled(e, y), x)
        vb, (gb,) = value_and_grad(lambda e: loss(e, y), x)
        torch.testing.assert_close(va, vb, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(ga, gb, rtol=1e-9, atol=1e-12)
    adj = getattr(mo.losses, name)(backend="cuda",
                                   expansion=mo.Expansion(n_points=2, pairs="adjacent"))
    compiled = torch.compile(lambda e, l: adj(e, l), fullgraph=True, dynamic=False)
    with pytest.raises(RuntimeError, match="different labels"):
        compiled(torch.randn(6, 7, device="cuda"), torch.tensor([0, 0, 1, 2, 2, 2], device="cuda"))


# ---------------------------------------------------------------- routing, opcheck, errors
def test_routing(monkeypatch):
    import metrix_ops.fused.cuda_ee_losses as cel
    calls = []
    for attr in ("neg_lse_cuda", "triplet_cuda"):
        real = getattr(cel, attr)
        monkeypatch.setattr(cel, attr, lambda *a, _r=real, **k: calls.append(1) or _r(*a, **k))
    x, y = _cuda(*batch(12, 4, 3, seed=1))
    for name in LOSSES:
        getattr(mo.losses, name)(backend="cuda", expansion=mo.Expansion(n_points=2))(x, y)
    assert len(calls) == len(LOSSES)
    # unnormalised synthetic points with L2 are not a function of cosines: not covered
    cu = mo.losses.LiftedStructureLoss(backend="cuda",
                                       expansion=mo.Expansion(n_points=2, normalize=False))
    with pytest.raises(NotImplementedError):
        cu(x, y)


def test_opcheck():
    xu, y, _ = odd_batch(11, 4, 3, seed=2)
    si, sj = all_segments(y)
    xd, yd, sid, sjd = _cuda(xu, y, si, sj)
    ones = torch.ones(11, dtype=torch.bool, device="cuda")
    counts = torch.bincount(y)[y] - 1
    pv = torch.rand(int(counts.sum()), dtype=xd.dtype, device="cuda").requires_grad_()
    xd.requires_grad_()
    for l2 in (False, True):
        torch.library.opcheck(torch.ops.metrix_ops.ee_neg_lse_fwd.default,
                              (xd, yd, sid, sjd, ones, ones, 2, l2, 2.0, -0.5, 4))
        torch.library.opcheck(torch.ops.metrix_ops.ee_triplet_fwd.default,
                              (xd, yd, sid, sjd, pv, 2, l2, 0.2, not l2, 4))


def test_bad_input():
    xu, y, _ = odd_batch(11, 4, 3, seed=2)
    si, sj = all_segments(y)
    xd = xu.cuda()
    ones = torch.ones(11, dtype=torch.bool, device="cuda")
    op = torch.ops.metrix_ops.ee_neg_lse_fwd
    with pytest.raises(RuntimeError, match="labels must be int64"):
        op(xd, y.cuda().int(), si.cuda(), sj.cuda(), ones, ones, 2, False, 1.0, 0.0, 4)
    with pytest.raises(RuntimeError, match="must be on x's device"):
        op(xd, y.cuda(), si.cuda(), sj.cuda(), ones.cpu(), ones, 2, False, 1.0, 0.0, 4)
    bad = sj.clone()
    bad[0] = (y != y[si[0]]).nonzero()[0, 0]
    with pytest.raises(RuntimeError, match="different labels"):
        op(xd, y.cuda(), si.cuda(), bad.cuda(), ones, ones, 2, False, 1.0, 0.0, 4)
