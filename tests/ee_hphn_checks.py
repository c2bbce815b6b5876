"""Checks of HPHNTripletLoss with Embedding Expansion shared by the GPU engines' test files
(test_triton_ee_hphn.py, test_cuda_ee_hphn.py): each takes the engine's backend name and a
function moving the test tensors to its device; the reference is the oracle."""
import torch
import torch.nn.functional as F

import metrix_ops as mo
from cases import assert_close_vg
from test_fused_hphn_cpu import batch


def engine_losses(backend, n, pairs="all", **kw):
    """The engine's loss and the reference's, with the same EE settings."""
    ee = mo.Expansion(n_points=n, pairs=pairs)
    return [mo.losses.HPHNTripletLoss(backend=be, expansion=ee, **kw)
            for be in (backend, "reference")]


def degenerate_batch(n):
    """Low dimension (large cosines, near-ties), a coincident segment whose points tie with
    its ends, an antipodal one, a nearly coincident one, a duplicate negative."""
    x, y = batch(48, 4, 16, seed=n)
    y[:12] = torch.arange(12) % 3
    x[3] = x[0]
    x[4] = -x[1]
    x[6] = x[0] + 1e-9 * x[2]
    x[13], y[13] = x[5], (y[5] + 1) % 12
    return x, y


def check_edge_labels(backend, dev, labels):
    y = torch.tensor(labels)
    x, _ = batch(len(labels), 5, 1, seed=4)
    x, y = dev(x, y)
    fused, ref = engine_losses(backend, 2)
    v = assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x)
    if len(set(labels)) in (1, len(labels)):
        assert v == 0


def check_duplicate_embeddings(backend, dev):
    x, y = batch(12, 6, 3, seed=5)
    x[1], y[1] = x[0], y[0]  # a duplicate positive
    x[5], y[5] = x[3], (y[3] + 1) % 3  # a duplicate negative: distance 0
    x[7] = x[9]
    x, y = dev(x, y)
    for n in (0, 1, 8):
        fused, ref = engine_losses(backend, n, margin=0.3)
        assert torch.isfinite(assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x))


def check_float32_and_half(backend, dev):
    x, y = batch(40, 16, 6, seed=2)
    x, y = dev(x, y)
    fused, ref = engine_losses(backend, 2)
    assert_close_vg(lambda e: fused(e.float(), y).double(),
                    lambda e: ref(e, y), x, rtol=1e-4, atol=1e-6)
    h = x.detach().half().requires_grad_()
    v = fused(h, y)
    v.backward()
    assert v.dtype == torch.float32 and torch.isfinite(h.grad).all()
    torch.testing.assert_close(v, ref(h.detach().float(), y), rtol=1e-4, atol=1e-5)


def brute_point_mine(x, labels, si, sj, n, lam, scale, inverted):
    """The op's contract by brute force over all point pairs (float64, the same association):
    per point its closest point of another class, ties to the lowest column."""
    b = len(labels)
    u = torch.cat([torch.arange(b), si.repeat_interleave(n)])
    w = torch.cat([torch.arange(b), sj.repeat_interleave(n)])
    g = x @ x.T
    lr, lc = lam[:, None], lam[None, :]
    h_u = lc * g[u][:, u] + (1 - lc) * g[u][:, w]
    h_w = lc * g[w][:, u] + (1 - lc) * g[w][:, w]
    s = (lr * h_u + (1 - lr) * h_w) / (scale[:, None] * scale[None, :])
    neg = labels[u][:, None] != labels[u][None, :]
    if inverted:
        m = s.masked_fill(~neg, float("-inf"))
        best = m.max(1).values
    else:
        d2 = 2 - 2 * s
        eps = torch.finfo(x.dtype).eps
        m = torch.where(d2 < 16 * eps, 0.0, d2.clamp_min(eps).sqrt())
        m = m.masked_fill(~neg, float("inf"))
        best = m.min(1).values
    cols = torch.where(neg & (m == best[:, None]), torch.arange(len(u)), len(u)).min(1).values
    return best, torch.where(cols < len(u), cols, -1)


def tie_tables(n, inverted):
    """Inputs of a point-mining op (x, labels, segments, λ and norm per point; any λ in (0, 1),
    segments of any positive pairs) with exact ties that come in an order other than the columns':
    segment pairs on the same rows whose λ (and norms) run in opposite orders, so a
    segment's later point equals an earlier point of the next segment; and duplicates of
    row 0 in every class."""
    g = torch.Generator().manual_seed(n + 10 * inverted)
    b, s = 75, 50
    x = F.normalize(torch.randn(b, 3, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 6, (b,), generator=g)
    x[40:46] = x[0]
    labels[40:46] = torch.arange(6)
    # segments: positive pairs (a row and a random member of its class, itself included)
    si = torch.randint(0, b, (s,), generator=g)
    pick = torch.rand(s, b, generator=g) * (labels[None, :] == labels[si][:, None])
    sj = pick.argmax(1)
    si[1::2], sj[1::2] = si[0::2], sj[0::2]
    lam = torch.rand(s, n, generator=g, dtype=torch.float64)
    lam[1::2] = lam[0::2].flip(1)
    scale = torch.rand(s, n, generator=g, dtype=torch.float64) + 0.5
    scale[1::2] = scale[0::2].flip(1)
    ones = torch.ones(b, dtype=torch.float64)
    return (x, labels, si, sj, torch.cat([ones, lam.reshape(-1)]),
            torch.cat([ones, scale.reshape(-1)]))
