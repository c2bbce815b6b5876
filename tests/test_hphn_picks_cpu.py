"""The HPHN picks op (csrc/cpu/hphn_picks_cpu.cpp): the positive's and the closest point
pair's similarities from mined indices, against the same values formed in PyTorch from
gathered rows (fused/hphn_triplet._pick_sims_torch, the GPU path) and against finite
differences; random picks of synthetic points, originals and rows without a pick, duplicate
rows, empty batch, errors, opcheck."""
import pytest
import torch
import torch.nn.functional as F

from metrix_ops import _ext
from metrix_ops.fused.hphn_triplet import _pick_sims_torch
from metrix_ops.ops.hphn_picks import hphn_pick_sims

pytestmark = pytest.mark.skipif(not _ext.HAS_EXT, reason="extension not built")


def random_picks(b, n, seed, none_rate=0.2, original_rate=0.3):
    """B × 7 picks as the miner writes them: a point is an original (i, i, n+1) or a segment's
    k-th point (u ≠ w, 1 ≤ k ≤ n); some rows have no positive, some no pair (−1)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.empty(b, 7, dtype=torch.long)
    idx[:, 0] = torch.randint(0, b, (b,), generator=g)
    for c in (1, 4):  # a point: (u, w, k)
        u = torch.randint(0, b, (b,), generator=g)
        w = (u + torch.randint(1, max(b, 2), (b,), generator=g)) % b
        k = torch.randint(1, n + 1, (b,), generator=g) if n > 0 else torch.ones(b, dtype=torch.long)
        orig = (torch.rand(b, generator=g) < original_rate) | (n == 0) | (u == w)
        idx[:, c] = u
        idx[:, c + 1] = torch.where(orig, u, w)
        idx[:, c + 2] = torch.where(orig, torch.full_like(k, n + 1), k)
    idx[torch.rand(b, generator=g) < none_rate, 0] = -1
    idx[torch.rand(b, generator=g) < none_rate, 1:] = -1
    return idx


def both(x, idx, n, l2, seed=1):
    """Values and gradients (random upstream weights) of the op and of the PyTorch form."""
    g = torch.Generator().manual_seed(seed)
    wp, ws = torch.randn(len(x), generator=g, dtype=x.dtype), torch.randn(len(x), generator=g,
                                                                          dtype=x.dtype)
    out = []
    for f in (hphn_pick_sims, _pick_sims_torch):
        xu = x.detach().clone().requires_grad_()
        pos, san = f(xu, idx, n, l2)
        ((pos * wp).sum() + (san * ws).sum()).backward()
        out.append((pos.detach(), san.detach(), xu.grad))
    return out


TOL = {torch.float64: (1e-12, 1e-10), torch.float32: (1e-5, 1e-4)}  # values, gradients


@pytest.mark.parametrize("l2", [False, True], ids=["cos", "l2"])
@pytest.mark.parametrize("b,d,n,seed,dtype", [
    (1, 3, 2, 0, torch.float64), (7, 5, 3, 1, torch.float64), (33, 17, 8, 2, torch.float64),
    (64, 129, 1, 3, torch.float64), (20, 9, 0, 4, torch.float64), (301, 70, 8, 5, torch.float32)])
def test_equals_torch_form(b, d, n, seed, dtype, l2):
    x = F.normalize(torch.randn(b, d, dtype=torch.float64,
                                generator=torch.Generator().manual_seed(seed)), dim=1).to(dtype)
    idx = random_picks(b, n, seed)
    (p1, s1, g1), (p2, s2, g2) = both(x, idx, n, l2)
    tv, tg = TOL[dtype]
    torch.testing.assert_close(p1, p2, rtol=tv, atol=tv)
    torch.testing.assert_close(s1, s2, rtol=tv, atol=tv)
    torch.testing.assert_close(g1, g2, rtol=tg, atol=tg)


@pytest.mark.parametrize("l2", [False, True], ids=["cos", "l2"])
def test_gradcheck(l2):
    """Finite differences: the chain rule through the lerps and the points' norms (rows
    need not be unit here: the op differentiates what it computes)."""
    x = torch.randn(9, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    idx = random_picks(9, 3, 6, none_rate=0.0)
    torch.autograd.gradcheck(lambda t: hphn_pick_sims(t, idx, 3, l2), (x.requires_grad_(),))


def test_duplicates_and_antipodal_endpoints():
    """A positive equal to its anchor (squared distance exactly 0, gradient 0), and a segment
    whose midpoint is the origin (the norm's clamp: finite values, no NaN)."""
    x = F.normalize(torch.randn(4, 6, dtype=torch.float64,
                                generator=torch.Generator().manual_seed(7)), dim=1)
    x[1] = x[0]
    x[3] = -x[2]
    idx = torch.tensor([[1, 2, 3, 1, 0, 0, 2],   # a = midpoint of (2, 3) = 0 at n = 1
                        [0, 1, 1, 2, 2, 2, 2],
                        [3, 2, 2, 2, 0, 1, 1],
                        [2, 3, 3, 2, 1, 1, 2]])
    xu = x.clone().requires_grad_()
    pos, san = hphn_pick_sims(xu, idx, 1, True)
    assert pos[0] == 0 and pos[1] == 0
    (pos.sum() + san.sum()).backward()
    assert torch.isfinite(san).all() and torch.isfinite(xu.grad).all()
    ours, torch_form = both(x, idx, 1, True)
    torch.testing.assert_close(ours, torch_form, rtol=1e-12, atol=1e-12)


def test_empty_batch():
    xu = torch.empty(0, 5, requires_grad=True)
    pos, san = hphn_pick_sims(xu, torch.empty(0, 7, dtype=torch.long), 2, False)
    assert pos.shape == (0,) and san.shape == (0,)
    (pos.sum() + san.sum()).backward()
    assert xu.grad.shape == (0, 5)


def test_op_errors():
    x = F.normalize(torch.randn(4, 3, dtype=torch.float64), dim=1)
    idx = random_picks(4, 2, 0)
    op = torch.ops.metrix_ops.hphn_pick_sims
    with pytest.raises(RuntimeError, match="idx must be int64 of shape"):
        op(x, idx[:3], 2, False)
    with pytest.raises(RuntimeError, match="idx must be int64 of shape"):
        op(x, idx.int(), 2, False)
    with pytest.raises(RuntimeError, match=r"idx\[0, 4\] must be in \[-1, 4\)"):
        op(x, torch.tensor([[0, 0, 0, 3, 9, 1, 1]] * 4), 2, False)
    with pytest.raises(RuntimeError, match=r"a point's k\) must be in \[-1, 3\]"):
        op(x, torch.tensor([[0, 0, 0, 4, 1, 1, 3]] * 4), 2, False)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        op(x.half(), idx, 2, False)
    with pytest.raises(RuntimeError, match="n_points"):
        op(x, idx, -1, False)
    with pytest.raises(RuntimeError, match="xu must be 2-D"):
        op(x[0], idx, 2, False)
    with pytest.raises(RuntimeError, match="grad_san must be of shape"):
        torch.ops.metrix_ops.hphn_pick_sims_bwd(torch.ones(4, dtype=x.dtype),
                                                torch.ones(3, dtype=x.dtype), x, idx, 2, False)


def test_opcheck():
    for dt in (torch.float64, torch.float32):
        x = F.normalize(torch.randn(11, 5, dtype=dt), dim=1).requires_grad_()
        torch.library.opcheck(torch.ops.metrix_ops.hphn_pick_sims.default,
                              (x, random_picks(11, 3, 8), 3, True))
