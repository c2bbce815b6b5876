"""The CUDA kernels of the listed-pair similarities (csrc/cuda/pair_sims_cuda.cu: the
pair_sims_fwd / pair_sims_bwd ops' CUDA implementations) against the C++ CPU op: values, and
the gradients over pairs listed several times and rows shared by many pairs (bucketed per
output row, summed in listed order: bitwise repeatable, allowed under torch's deterministic
mode); odd widths; an empty list; bad input. And the indices_tuple paths they serve on
backend="cuda" (fused/cuda_pairs.py: the CPU glue of fused/indices/) against the reference,
with the weighted ProxyAnchor op (csrc/cuda/proxy_losses_cuda.cu) against the CPU op. The
registration is checked on any CUDA build; the rest needs a GPU."""
import pytest
import torch

import metrix_ops as mo
from cases import assert_close_vg, check_tuple_loss_on_cuda
from metrix_ops import _ext, fused

CUDA_BUILD = _ext.has_cuda_kernel("pair_sims_fwd")
on_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and CUDA_BUILD),
                            reason="needs a CUDA device and the compiled CUDA kernels")


@pytest.fixture(autouse=True)
def _fp32_products(no_tf32):  # conftest.py
    pass


@pytest.mark.skipif(not CUDA_BUILD, reason="the CUDA kernels are registered by a CUDA build")
def test_tuple_paths_registered_for_the_cuda_engine():
    names = {n for (b, n) in fused.INDICES_IMPLS if b == "cuda"}
    cpu = {n for (b, n) in fused.INDICES_IMPLS if b == "cpu"}
    assert names == cpu
    assert {"MultiSimilarityLoss", "ContrastiveLoss", "TripletMarginLoss", "NPairsLoss",
            "ProxyNCALoss", "ProxyAnchorLoss"} <= names


def _pairs(b, m, p, g):
    rows, cols = torch.randint(0, b, (p,), generator=g), torch.randint(0, m, (p,), generator=g)
    if p > 4:  # a pair listed three times, a row shared by many pairs
        rows[1:4], cols[1:4] = rows[0], cols[0]
        rows[p // 2:] = rows[0]
    return rows, cols


@on_gpu
@pytest.mark.parametrize("b,m,d,p", [(7, 9, 3, 40), (20, 33, 37, 300), (5, 6, 130, 65),
                                     (4, 4, 8, 0), (3, 2, 1, 9)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kernels_match_the_cpu_op(b, m, d, p, dtype):
    ops = torch.ops.metrix_ops
    g = torch.Generator().manual_seed(b + p)
    x, r = torch.randn(b, d, dtype=dtype, generator=g), torch.randn(m, d, dtype=dtype, generator=g)
    rows, cols = _pairs(b, m, p, g)
    gr = torch.randn(p, dtype=dtype, generator=g)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    on = [t.cuda() for t in (x, r, rows, cols)]
    torch.testing.assert_close(ops.pair_sims_fwd(*on).cpu(), ops.pair_sims_fwd(x, r, rows, cols),
                               **tol)
    want = ops.pair_sims_bwd(gr, x, r, rows, cols)
    got = ops.pair_sims_bwd(gr.cuda(), *on)
    for a, w in zip(got, want):
        torch.testing.assert_close(a.cpu(), w, **tol)
    again = ops.pair_sims_bwd(gr.cuda(), *on)
    assert all(torch.equal(a, c) for a, c in zip(got, again))  # no atomics: bitwise repeatable


@on_gpu
def test_backward_runs_under_deterministic_mode():
    x, r = torch.randn(4, 3, device="cuda"), torch.randn(5, 3, device="cuda")
    rows, cols = torch.tensor([0, 1, 1], device="cuda"), torch.tensor([2, 4, 4], device="cuda")
    old = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        dx, dr = torch.ops.metrix_ops.pair_sims_bwd(torch.ones(3, device="cuda"), x, r, rows,
                                                    cols)
    finally:
        torch.use_deterministic_algorithms(old)
    torch.testing.assert_close(dx[1], 2 * r[4])
    torch.testing.assert_close(dr[4], 2 * x[1])


@on_gpu
def test_kernels_check_their_inputs():
    ops = torch.ops.metrix_ops
    x, r = torch.randn(4, 3, device="cuda"), torch.randn(5, 3, device="cuda")
    rows, cols = torch.tensor([0, 1], device="cuda"), torch.tensor([2, 4], device="cuda")
    with pytest.raises(RuntimeError, match="rows must be in"):
        ops.pair_sims_fwd(x, r, rows + 3, cols)
    with pytest.raises(RuntimeError, match="one device"):
        ops.pair_sims_fwd(x, r, rows.cpu(), cols)
    with pytest.raises(RuntimeError, match="grad must be 1-D of length 2"):
        ops.pair_sims_bwd(torch.ones(3, device="cuda"), x, r, rows, cols)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ops.pair_sims_fwd(x.half(), r.half(), rows, cols)


@on_gpu
@pytest.mark.parametrize("name,miner", [("MultiSimilarityLoss", "ms"), ("CircleLoss", "ms"),
                                        ("ContrastiveLoss", "ms"), ("TripletMarginLoss", "tm"),
                                        ("LiftedStructureLoss", "ms"), ("NTXentLoss", "ms"),
                                        ("SupConLoss", "ms"),
                                        ("GeneralizedLiftedStructureLoss", "ms"),
                                        ("NPairsLoss", "ms")])
def test_tuple_losses_on_cuda_match_reference(name, miner):
    check_tuple_loss_on_cuda("cuda", name, miner)


@on_gpu
@pytest.mark.parametrize("name", ["ProxyNCALoss", "ProxyAnchorLoss"])
def test_proxy_tuples_on_cuda_match_reference(name):
    """PML weights the examples by their count in the tuple: ProxyNCA its rows, ProxyAnchor
    every exponent (the weighted op, proxy_anchor_weighted_* on CUDA)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(30, 8, dtype=torch.float64, generator=g).cuda()
    y = torch.randint(0, 6, (30,), generator=g).cuda()
    t = mo.miners.MultiSimilarityMiner(0.1)(x, y)
    ours = getattr(mo.losses, name)(6, 8, backend="cuda").cuda().double()
    ref = getattr(mo.losses, name)(6, 8, backend="reference").cuda().double()
    ref.load_state_dict(ours.state_dict())
    assert_close_vg(lambda e: ours(e, y, t), lambda e: ref(e, y, t), x)
    ours.zero_grad()
    ref.zero_grad()
    ours(x, y, t).backward()
    ref(x, y, t).backward()
    torch.testing.assert_close(ours.proxies.grad, ref.proxies.grad, rtol=1e-7, atol=1e-10)


@on_gpu
def test_weighted_proxy_anchor_op_matches_the_cpu_op():
    from metrix_ops.ops.proxy_anchor import proxy_anchor_terms
    g = torch.Generator().manual_seed(5)
    x = torch.nn.functional.normalize(torch.randn(41, 7, dtype=torch.float64, generator=g), dim=1)
    p = torch.nn.functional.normalize(torch.randn(6, 7, dtype=torch.float64, generator=g), dim=1)
    y = torch.randint(0, 6, (41,), generator=g)
    lw = torch.randn(41, dtype=torch.float64, generator=g)
    wp, wn = (torch.randn(6, dtype=torch.float64, generator=g) for _ in range(2))

    def run(dev, chunk):
        leaves = [t.to(dev).clone().requires_grad_() for t in (x, p)]
        pos, neg = proxy_anchor_terms(*leaves, y.to(dev), 32.0, 0.1, chunk, log_w=lw.to(dev))
        v = (pos * wp.to(dev)).sum() + (neg * wn.to(dev)).sum()
        return [t.detach().cpu() for t in (pos, neg, *torch.autograd.grad(v, leaves))]
    for chunk in (4, 64):
        for a, b in zip(run("cuda", chunk), run("cpu", 8)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
