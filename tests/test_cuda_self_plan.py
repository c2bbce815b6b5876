"""The CUDA self ops' block plan (csrc/cuda/pair_rows.cuh: fold_self, fold_cols_kernel,
merge_cols_kernel, grad_self), transcribed to Python loops with the same indices, for the
multi-similarity loss, against the CPU self op (itself checked against PML): which pairs each
row's state receives (every pair (i, j ≠ i) once for row i and once for row j, none twice)
and the values and gradient the plan gives. Runs on the CPU; the kernels themselves run in
tests/test_cuda_self_ops.py on a GPU."""
import pytest
import torch
import torch.nn.functional as F

from metrix_ops import _ext

pytestmark = pytest.mark.skipif(not _ext.HAS_EXT, reason="needs the compiled extension")

ALPHA, BETA, BASE = 2.0, 10.0, 0.5
COL_TILE, ROW_LANES = 32, 8  # kColTile, kRowLanes (kThreads / kColTile)


def fold_self_plan(x, y, block, seg_rows):
    """Per row, the list of (reference, s) its state folds, in fold_self's order."""
    b = len(x)
    folds = [[] for _ in range(b)]
    block = min(block, b)
    for i0 in range(0, b, block):
        ni = min(block, b - i0)
        for j0 in range(i0, b, block):
            nj = min(block, b - j0)
            s = x[i0:i0 + ni] @ x[j0:j0 + nj].t()
            for i in range(ni):  # fold_rows_kernel: row i0 + i over columns j0 + j
                gi = i0 + i
                for j in range(nj):
                    if j0 + j != gi:
                        folds[gi].append((j0 + j, s[i, j]))
            if j0 == i0:
                continue
            segs = (ni + seg_rows - 1) // seg_rows
            part = {}
            for seg in range(segs):  # fold_cols_kernel's grid.y, then its lanes' merge
                for j in range(nj):
                    lanes = []
                    for lane in range(ROW_LANES):
                        seg_end = min(seg * seg_rows + seg_rows, ni)
                        lanes.append([(i0 + i, s[i, j])
                                      for i in range(seg * seg_rows + lane, seg_end, ROW_LANES)
                                      if i0 + i != j0 + j])
                    part[seg, j] = [t for lane in lanes for t in lane]
            for j in range(nj):  # merge_cols_kernel
                for seg in range(segs):
                    folds[j0 + j].extend(part[seg, j])
    return folds


def ms_rows(folds, y):
    rows, lps, lns = [], [], []
    for i, terms in enumerate(folds):
        pos = [-ALPHA * (s - BASE) for j, s in terms if y[j] == y[i]]
        neg = [BETA * (s - BASE) for j, s in terms if y[j] != y[i]]
        lp = torch.logsumexp(torch.stack([torch.zeros((), dtype=torch.float64)] + pos), 0)
        ln = torch.logsumexp(torch.stack([torch.zeros((), dtype=torch.float64)] + neg), 0)
        rows.append(lp / ALPHA + ln / BETA)
        lps.append(lp)
        lns.append(ln)
    return torch.stack(rows), torch.stack(lps), torch.stack(lns)


def ms_grad(s, pos, g, lp, ln):
    """MsRowLoss::grad: ∂(g · row)/∂s of one entry for its row's statistics."""
    if pos:
        return -g * torch.exp(-ALPHA * (s - BASE) - lp)
    return g * torch.exp(BETA * (s - BASE) - ln)


def grad_self_plan(x, y, block, g, lp, ln):
    b = len(x)
    dx = torch.zeros_like(x)
    for i0 in range(0, b, block):
        ni = min(block, b - i0)
        for j0 in range(i0, b, block):
            nj = min(block, b - j0)
            h = x[i0:i0 + ni] @ x[j0:j0 + nj].t()
            for i in range(ni):  # grad_entries_kernel<..., kSym>
                for j in range(nj):
                    gi, gj = i0 + i, j0 + j
                    if gi == gj:
                        h[i, j] = 0
                        continue
                    pos = bool(y[gi] == y[gj])
                    s = h[i, j].clone()
                    h[i, j] = (ms_grad(s, pos, g[gi], lp[gi], ln[gi])
                               + ms_grad(s, pos, g[gj], lp[gj], ln[gj]))
            dx[i0:i0 + ni] += h @ x[j0:j0 + nj]
            if j0 != i0:
                dx[j0:j0 + nj] += h.t() @ x[i0:i0 + ni]
    return dx


@pytest.mark.parametrize("b,block,seg_rows", [(1, 4, 256), (9, 4, 256), (23, 7, 3),
                                              (40, 17, 5), (40, 40, 256), (33, 64, 2)])
def test_plan_folds_each_pair_once_per_row_and_matches_the_cpu_op(b, block, seg_rows):
    g0 = torch.Generator().manual_seed(b * 100 + block)
    x = F.normalize(torch.randn(b, 5, dtype=torch.float64, generator=g0), dim=1)
    y = torch.randint(0, 3, (b,), generator=g0)
    folds = fold_self_plan(x, y, block, seg_rows)
    for i, terms in enumerate(folds):
        refs = sorted(j for j, _ in terms)
        assert refs == [j for j in range(b) if j != i], i
        for j, s in terms:  # each term is s_ij (up to the product's rounding)
            torch.testing.assert_close(s, x[i] @ x[j], rtol=1e-12, atol=1e-12)
    rows, lp, ln = ms_rows(folds, y)
    cpu = torch.ops.metrix_ops.ms_loss_self_fwd(x, y, ALPHA, BETA, BASE, block)
    for a, c in zip((rows, lp, ln), cpu):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)
    grad = torch.rand(b, dtype=torch.float64, generator=g0)
    dx = grad_self_plan(x, y, block, grad, lp, ln)
    dx_cpu = torch.ops.metrix_ops.ms_loss_self_bwd(grad, x, y, cpu[1], cpu[2], ALPHA, BETA,
                                                   BASE, block)
    torch.testing.assert_close(dx, dx_cpu, rtol=1e-10, atol=1e-12)


def test_routing_traces_under_compile():
    """fused/multi_similarity._self_pairs_only sends CUDA calls of the batch against itself to
    the self ops from a set read at import: a dispatcher query per call would stop a
    fullgraph compile of the loss there (Dynamo's "torch.* op returned non-Tensor")."""
    from types import SimpleNamespace

    from metrix_ops.fused import multi_similarity as glue
    emb = SimpleNamespace(device=torch.device("cuda"))
    inp = SimpleNamespace(embeddings=emb, ref_emb=emb, same_set=True)

    def f(t):
        return t + 1 if glue._self_pairs_only(inp, "ms_loss_self_fwd") else t - 1

    t = torch.zeros(3)
    assert torch.equal(torch.compile(f, fullgraph=True)(t), f(t))
    expected = 1.0 if _ext.has_cuda_kernel("ms_loss_self_fwd") else -1.0
    assert f(t)[0].item() == expected
