"""backend="cuda" for HPHNTripletLoss with Embedding Expansion (csrc/cuda/ee_point_mine_cuda.cu:
per point its closest point of another class, from per-chunk Gram products; the per-anchor
picks of fused/ee_hphn_picks.py) against the reference: the mined indices exactly (float64)
over n, pairs and both metrics, chunks of 1 to 64 mining units, near-ties, coincident and
antipodal segments, duplicates, n above one warp's 8 points; loss and gradient; edge labels;
fp32 and half; routing; opcheck; bad input. Skipped without a GPU and the compiled CUDA
kernels."""
import pytest
import torch
import torch.nn.functional as F

import metrix_ops as mo
from cases import assert_close_vg
from metrix_ops import _ext
from metrix_ops.distances import CosineSimilarity, LpDistance
from metrix_ops.ops.ee_mining import all_segments
from metrix_ops.reference.expansion_points import expansion_segments
from ee_hphn_checks import (brute_point_mine, check_duplicate_embeddings, check_edge_labels,
                            check_float32_and_half, degenerate_batch, engine_losses,
                            tie_tables)
from test_fused_hphn_cpu import batch, ref_picks

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and _ext.HAS_CUDA_EXT),
                                reason="needs a CUDA device and the compiled CUDA kernels")


@pytest.fixture(autouse=True)
def _fp32_products(no_tf32):  # conftest.py
    pass


def _cuda(*ts):
    return tuple(t.cuda() for t in ts)


def picks(x, y, n, pairs, dist, chunk=None):
    from metrix_ops.fused.cuda_ee_hphn import ee_hphn_mine_cuda
    if n == 0:
        si = sj = y.new_empty(0)
    else:
        si, sj = all_segments(y) if pairs == "all" else expansion_segments(y, pairs)
    return ee_hphn_mine_cuda(F.normalize(x, dim=1), y, si, sj, n, dist().is_inverted, chunk)


@pytest.mark.parametrize("n,b,d,classes", [(n, *c) for n in (0, 2, 8, 11)
                                           for c in ((2, 3, 1), (7, 16, 3), (33, 16, 5))]
                         + [(2, 70, 3, 2)])
@pytest.mark.parametrize("pairs", ["all", "adjacent"])
@pytest.mark.parametrize("dist", [LpDistance, CosineSimilarity])
def test_indices_equal_reference(n, pairs, dist, b, d, classes):
    x, y = batch(b, d, classes, seed=b + n, contiguous=pairs == "adjacent")
    expect = ref_picks(x, y, n, pairs, dist())
    for chunk in (None, 1, 5):
        assert torch.equal(picks(x.cuda(), y.cuda(), n, pairs, dist, chunk).cpu(), expect)


@pytest.mark.parametrize("n", [1, 3, 9])
@pytest.mark.parametrize("dist", [LpDistance, CosineSimilarity])
def test_indices_near_ties_and_degenerate_segments(n, dist):
    x, y = degenerate_batch(n)
    expect = ref_picks(x, y, n, "all", dist())
    assert torch.equal(picks(x.cuda(), y.cuda(), n, "all", dist).cpu(), expect)


@pytest.fixture
def op_calls(monkeypatch):
    import metrix_ops.fused.cuda_ee_hphn as ce
    calls, real = [], ce.ee_hphn_mine_cuda
    monkeypatch.setattr(ce, "ee_hphn_mine_cuda", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("n,pairs", [(0, "all"), (2, "all"), (8, "all"), (2, "adjacent")])
@pytest.mark.parametrize("dist", [LpDistance, CosineSimilarity])
def test_loss_and_grad_float64(n, pairs, dist, op_calls):
    x, y = batch(29, 7, 5, seed=n, contiguous=pairs == "adjacent")
    x, y = x.cuda(), y.cuda()
    fused, ref = engine_losses("cuda", n, pairs, distance=dist(), margin=0.3)
    assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x)
    assert op_calls


@pytest.mark.parametrize("labels", [[0], [0, 0, 0, 0, 0], [0, 1, 2, 3, 4], [0, 0, 1, 2, 2, 2, 3]],
                         ids=["b1", "one_class", "singletons", "size1_classes"])
def test_edge_labels(labels):
    check_edge_labels("cuda", _cuda, labels)


def test_duplicate_embeddings():
    check_duplicate_embeddings("cuda", _cuda)


def test_float32_and_half():
    check_float32_and_half("cuda", _cuda)


def _table():
    x = F.normalize(torch.randn(9, 4, dtype=torch.float64), dim=1).cuda()
    # 9 originals, then 2 segments of n = 2 points
    pu = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 3, 3]).cuda()
    pw = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 1, 1, 4, 4]).cuda()
    lam = torch.tensor([1.0] * 9 + [2 / 3, 1 / 3] * 2, dtype=torch.float64).cuda()
    lab = torch.tensor([0, 0, 1, 2, 2, 1, 3, 3, 0, 0, 0, 2, 2]).cuda()
    return x, pu, pw, lam, torch.ones_like(lam), lab


def test_opcheck():
    for inverted in (False, True):
        torch.library.opcheck(torch.ops.metrix_ops.ee_point_mine.default,
                              (*_table(), 2, inverted, 3))


@pytest.mark.parametrize("n", [1, 2, 5, 11])
@pytest.mark.parametrize("inverted", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_point_mine_equals_brute_force_with_ties(n, inverted, chunk):
    """The op against brute force on arbitrary λ and norms per point, with exact ties across
    column segments in an order other than the columns' (ee_hphn_checks.tie_tables), and
    n = 11 (a segment over two row units)."""
    x, labels, si, sj, lam, scale = tie_tables(n, inverted)
    b = len(labels)
    pu = torch.cat([torch.arange(b), si.repeat_interleave(n)])
    pw = torch.cat([torch.arange(b), sj.repeat_interleave(n)])
    best, col = torch.ops.metrix_ops.ee_point_mine(*_cuda(x, pu, pw, lam, scale, labels[pu]),
                                                   n, inverted, chunk)
    eb, ec = brute_point_mine(x, labels, si, sj, n, lam, scale, inverted)
    assert torch.equal(col.cpu(), ec)
    torch.testing.assert_close(best.cpu(), eb, rtol=1e-12, atol=1e-12)


def test_under_fullgraph_compile_equals_eager():
    """The module traces whole: the per-anchor picks (fused/ee_hphn_picks.py, shared with
    Triton) are scatter reductions, no table sized by the labels' values."""
    torch._dynamo.reset()
    loss = mo.losses.HPHNTripletLoss(backend="cuda", expansion=mo.Expansion(n_points=3))
    compiled = torch.compile(lambda e, lab: loss(e, lab), fullgraph=True, backend="eager")
    for b, k in [(14, 4), (6, 6), (2, 1)]:
        x, y = batch(b, 7, k, seed=b)
        x, y = _cuda(x, y)
        assert_close_vg(lambda e: compiled(e, y), lambda e: loss(e, y), x)


def test_bad_input_names_the_argument():
    x, pu, pw, lam, scale, lab = _table()
    op = torch.ops.metrix_ops.ee_point_mine
    with pytest.raises(RuntimeError, match="n_points"):
        op(x, pu, pw, lam, scale, lab, 3, True, 4)  # 4 synthetic points are not runs of 3
    with pytest.raises(RuntimeError, match="pu: the n points"):
        op(x, pu.flip(0), pw, lam, scale, lab, 2, True, 4)
    with pytest.raises(RuntimeError, match="rows of x"):
        op(x, pu + 9, pw, lam, scale, lab, 2, True, 4)
    with pytest.raises(RuntimeError, match="plam must be"):
        op(x, pu, pw, lam.float(), scale, lab, 2, True, 4)
    with pytest.raises(RuntimeError, match="chunk must be"):
        op(x, pu, pw, lam, scale, lab, 2, True, 0)
