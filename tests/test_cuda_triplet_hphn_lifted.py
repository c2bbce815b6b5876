"""backend="cuda" for TripletMarginLoss (triplets_per_anchor="all"; csrc/cuda/triplet_cuda.cu),
the clean HPHNTripletLoss (its mining op, csrc/cuda/hphn_mine_cuda.cu) and
LiftedStructureLoss (csrc/cuda/lifted_cuda.cu), and the loss option miner= on the CUDA engine:
MultiSimilarityLoss with MultiSimilarityMiner (csrc/cuda/ms_mined_cuda.cu), TripletMarginLoss
with TripletMarginMiner (triplet_cuda.cu's mined op) or BatchHardMiner: values and gradients against the reference
over the shared cases, the ops against the CPU ops (chunk boundaries, many positives per
row, ties, PML's partner rows), ref_emb, reducers, opcheck, bad input. Skipped without a GPU
and the compiled CUDA kernels; the per-element math the kernels run is common/triplet.h and
common/lifted.h and common/lse_acc.h, which the CPU tests check."""
import pytest
import torch
import torch.nn.functional as F

import metrix_ops as mo
from cases import CASE_IDS, CASES, FP32_GRAD, MetrixOpCalls, assert_close_vg, make_case
from metrix_ops import _ext
from metrix_ops.distances import CosineSimilarity
from metrix_ops.ops.ee_mining import ee_hphn_mine
from metrix_ops.reducers import MeanReducer, SumReducer, ThresholdReducer

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and _ext.HAS_CUDA_EXT),
                                reason="needs a CUDA device and the compiled CUDA kernels")

LOSSES = [
    ("TripletMarginLoss", {}),  # L2 of unit rows, AvgNonZero
    ("TripletMarginLoss", {"distance": "cosine", "margin": 0.3}),
    ("TripletMarginLoss", {"margin": 0.2, "reducer": "mean"}),
    ("TripletMarginLoss", {"distance": "cosine", "reducer": "sum"}),
    ("HPHNTripletLoss", {}),
    ("HPHNTripletLoss", {"reduction": "sum", "margin": 1e-5}),  # the official runs' setting
    ("HPHNTripletLoss", {"distance": "cosine"}),
    ("LiftedStructureLoss", {}),
    ("LiftedStructureLoss", {"distance": "cosine", "pos_margin": 0.9, "neg_margin": 0.2}),
    ("LiftedStructureLoss", {"pos_margin": 0.4, "neg_margin": 2.5, "reducer": "sum"}),
    ("LiftedStructureLoss", {"neg_margin": 0.3, "pos_margin": 0.8, "reducer": "threshold"}),
]
LOSS_IDS = ["tri", "tri_cos", "tri_mean", "tri_sum", "hphn", "hphn_sum", "hphn_cos", "lifted",
            "lifted_cos", "lifted_sum", "lifted_window"]
NO_EMPTY = torch.empty(0, dtype=torch.long)


@pytest.fixture(autouse=True)
def _fp32_products(no_tf32):  # conftest.py
    pass


def make(name, kw, backend):
    kw = dict(kw)
    if kw.get("distance") == "cosine":
        kw["distance"] = CosineSimilarity()
    kw["reducer"] = {"mean": MeanReducer(), "sum": SumReducer(),
                     "threshold": ThresholdReducer(low=0.2, high=2.0), None: None}[kw.get("reducer")]
    if kw["reducer"] is None:
        del kw["reducer"]
    return getattr(mo.losses, name)(backend=backend, **kw)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("name,kw", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float64, 1e-6, 1e-9),
                                             (torch.float32, 1e-4, 1e-5)])
def test_matches_reference(case, name, kw, dtype, rtol, atol):
    x, y = make_case(case, dtype)
    x, y = x.detach().cuda(), y.cuda()
    fused, ref = make(name, kw, "cuda"), make(name, kw, "reference")
    assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x, rtol=rtol, atol=atol,
                    grad_atol_of_max=FP32_GRAD[dtype])


@pytest.mark.parametrize("m", [17, 41])  # fewer and more references than anchors
@pytest.mark.parametrize("name,kw", LOSSES, ids=LOSS_IDS)
def test_ref_emb(name, kw, m):
    """ref_emb/ref_labels (the lifted loss's partner rows: reference p < B is batch row p)."""
    g = torch.Generator().manual_seed(m)
    x = torch.randn(29, 9, dtype=torch.float64, generator=g).cuda()
    r = torch.randn(m, 9, dtype=torch.float64, generator=g).cuda()
    y = torch.randint(0, 5, (29,), generator=g).cuda()
    yr = torch.randint(0, 5, (m,), generator=g).cuda()
    fused, ref = make(name, kw, "cuda"), make(name, kw, "reference")
    assert_close_vg(lambda e, f: fused(e, y, ref_emb=f, ref_labels=yr),
                    lambda e, f: ref(e, y, ref_emb=f, ref_labels=yr), x, r)


def test_bf16_embeddings_give_an_fp32_loss():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(40, 16, generator=g).cuda()
    y = torch.randint(0, 6, (40,), generator=g).cuda()
    for name in ("TripletMarginLoss", "HPHNTripletLoss", "LiftedStructureLoss"):
        fused, ref = make(name, {}, "cuda"), make(name, {}, "reference")
        xb = x.bfloat16().requires_grad_(True)
        out = fused(xb, y)
        out.backward()
        assert out.dtype == torch.float32 and torch.isfinite(xb.grad.float()).all()
        torch.testing.assert_close(out, ref(xb.detach().float(), y), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cosine", [True, False])
@pytest.mark.parametrize("chunk", [1, 7, 64])
# 2 classes: ~80 positives per row, past the CPU op's dense path (64) into its search path,
# the one the CUDA kernels follow; 9: ~18, its dense path
@pytest.mark.parametrize("classes", [2, 9])
def test_triplet_op_equals_the_cpu_op(cosine, chunk, classes):
    """The CUDA op's totals and gradients against the CPU op's (itself checked against the
    reference in the CPU tests) in fp64: chunks of anchors, rows with many positives, tied
    keys from duplicated rows (cosine), a margin at which some triplets are exactly 0."""
    g = torch.Generator().manual_seed(chunk * 10 + classes)
    x = F.normalize(torch.randn(161, 5, dtype=torch.float64, generator=g), dim=1)
    if cosine:  # tied keys (L2 distances of equal rows are cdist's rounding, device-specific)
        x[7] = x[3]
        x[20] = x[3]
    y = torch.randint(0, classes, (161,), generator=g)
    grad = torch.rand(161, dtype=torch.float64, generator=g)
    grad[5] = 0  # a row whose gradient is skipped
    for same in (True, False):
        r, yr = (x, y) if same else (x[:145].flip(0).contiguous(), y[:145].flip(0).contiguous())
        args = (same, cosine, 0.1, chunk)
        cpu = torch.ops.metrix_ops.triplet_all_fwd(x, r, y, yr, *args)
        dev = torch.ops.metrix_ops.triplet_all_fwd(x.cuda(), r.cuda(), y.cuda(), yr.cuda(), *args)
        for a, b in zip(dev, cpu):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-12)
        cpu = torch.ops.metrix_ops.triplet_all_bwd(grad, x, r, y, yr, *args)
        dev = torch.ops.metrix_ops.triplet_all_bwd(grad.cuda(), x.cuda(), r.cuda(), y.cuda(),
                                                   yr.cuda(), *args)
        for a, b in zip(dev, cpu):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 6, 256])
def test_hphn_mining_op_equals_the_cpu_op(chunk):
    """The picks, ties included (duplicated rows give equal similarities: the lowest column
    wins), a class of one (no positive) and a batch of one class (no negative)."""
    g = torch.Generator().manual_seed(chunk)
    x = F.normalize(torch.randn(53, 6, dtype=torch.float64, generator=g), dim=1)
    x[9] = x[2]
    x[30] = x[2]
    x[31] = x[4]
    y = torch.randint(0, 7, (53,), generator=g)
    y[40] = 99  # no positive
    for xs, ys in [(x, y), (x[:12], torch.zeros(12, dtype=torch.long))]:
        cpu = ee_hphn_mine(xs, ys, NO_EMPTY, NO_EMPTY, 0, chunk)
        dev = ee_hphn_mine(xs.cuda(), ys.cuda(), NO_EMPTY.cuda(), NO_EMPTY.cuda(), 0, chunk)
        torch.testing.assert_close(dev.cpu(), cpu, rtol=0, atol=0)


@pytest.mark.parametrize("cosine", [True, False])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_lifted_op_equals_the_cpu_op(cosine, chunk):
    """lifted_fwd/bwd on label-sorted rows against the CPU op in fp64: row chunks that cut a
    class, partner rows (some −1, as for references past the batch), a window that drops
    some terms."""
    g = torch.Generator().manual_seed(chunk)
    x = F.normalize(torch.randn(40, 6, dtype=torch.float64, generator=g), dim=1)
    r = F.normalize(torch.randn(33, 6, dtype=torch.float64, generator=g), dim=1)
    y = torch.randint(0, 5, (40,), generator=g).sort().values
    ry = torch.randint(0, 6, (33,), generator=g).sort().values
    partner = torch.randperm(40, generator=g)[:33]
    partner[::4] = -1
    gs = torch.rand(40, dtype=torch.float64, generator=g)
    cases = [(x, r, y, ry, partner, False), (x, x, y, y, torch.arange(40), True)]
    for xs, rs, ys, rys, ps, excl in cases:
        args = (excl, cosine, 0.1, 0.9, 0.05, 3.0, chunk)
        cpu = torch.ops.metrix_ops.lifted_fwd(xs, rs, ys, rys, ps, *args)
        dev_in = [t.cuda() for t in (xs, rs, ys, rys, ps)]
        dev = torch.ops.metrix_ops.lifted_fwd(*dev_in, *args)
        for a, b in zip(dev, cpu):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-12)
        cpu = torch.ops.metrix_ops.lifted_bwd(gs, xs, rs, ys, rys, ps, cpu[2], *args)
        dev = torch.ops.metrix_ops.lifted_bwd(gs.cuda(), *dev_in, dev[2], *args)
        for a, b in zip(dev, cpu):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-12)


MINERS = [({}, 0.1), ({"alpha": 1.3, "beta": 20.0, "base": 0.3}, 0.05), ({}, 0.0)]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("kw,eps", MINERS, ids=["ms", "ms_kw", "eps0"])
@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float64, 1e-6, 1e-9),
                                             (torch.float32, 1e-4, 1e-5)])
def test_ms_miner_matches_pml_two_calls(case, kw, eps, dtype, rtol, atol):
    """miner= inside the CUDA op against the reference loss on the miner's index tuple (PML's
    loss(x, y, miner(x, y)))."""
    x, y = make_case(case, dtype)
    x, y = x.detach().cuda(), y.cuda()
    miner = mo.miners.MultiSimilarityMiner(eps)
    fused = mo.losses.MultiSimilarityLoss(backend="cuda", miner=miner, **kw)
    ref = mo.losses.MultiSimilarityLoss(backend="reference", **kw)
    assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y, miner(e, y)), x, rtol=rtol,
                    atol=atol, grad_atol_of_max=FP32_GRAD[dtype])


@pytest.mark.parametrize("chunk", [1, 6, 64])
def test_ms_mined_ops_equal_the_cpu_ops(chunk):
    """Bounds, kept counts, rows and gradients against the CPU ops in fp64, chunked, with
    references (exclude_diag off) and without."""
    g = torch.Generator().manual_seed(chunk)
    x = F.normalize(torch.randn(45, 7, dtype=torch.float64, generator=g), dim=1)
    y = torch.randint(0, 5, (45,), generator=g)
    gr = torch.rand(45, dtype=torch.float64, generator=g)
    op = torch.ops.metrix_ops
    for r, yr, excl in [(x, y, True), (x[:30].flip(0).contiguous(), y[:30].flip(0).contiguous(),
                                        False)]:
        cpu_b = op.ms_mine_bounds(x, r, y, yr, excl, chunk)
        dev_in = [t.cuda() for t in (x, r, y, yr)]
        dev_b = op.ms_mine_bounds(*dev_in, excl, chunk)
        for a, b in zip(dev_b, cpu_b):  # entries of S from two BLAS: equal to rounding
            torch.testing.assert_close(a.cpu(), b, rtol=1e-12, atol=1e-14)
        # both ops on the CPU's bounds, so that the kept pairs are the same set
        dev_b = [t.cuda() for t in cpu_b]
        args = (excl, 2.0, 40.0, 0.5, 0.1, chunk)
        cpu = op.ms_mined_fwd(x, r, y, yr, *cpu_b, *args)
        dev = op.ms_mined_fwd(*dev_in, *dev_b, *args)
        for a, b in zip(dev, cpu):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-12)
        cpu = op.ms_mined_bwd(gr, x, r, y, yr, cpu[1], cpu[2], *cpu_b, *args)
        dev = op.ms_mined_bwd(gr.cuda(), *dev_in, dev[1], dev[2], *dev_b, *args)
        for a, b in zip(dev, cpu):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-12)


TRIPLET_MINERS = [("all", 0.2, {}), ("hard", 0.1, {"distance": "cosine"}),
                  ("semihard", 0.2, {"margin": 0.1}), ("easy", 0.3, {}),
                  ("semihard", 0.2, {"smooth_loss": True}), ("batch_hard", None, {}),
                  ("batch_hard", None, {"distance": "cosine", "reducer": "sum"})]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("kind,mm,kw", TRIPLET_MINERS,
                         ids=["all", "hard_cos", "semihard", "easy", "semihard_smooth", "bh",
                              "bh_cos_sum"])
def test_triplet_miners_match_pml_two_calls(case, kind, mm, kw):
    x, y = make_case(case, torch.float64)
    x, y = x.detach().cuda(), y.cuda()
    dist = CosineSimilarity() if kw.get("distance") == "cosine" else None
    if kind == "batch_hard":
        miner = mo.miners.BatchHardMiner(**({"distance": dist} if dist else {}))
    else:
        miner = mo.miners.TripletMarginMiner(mm, type_of_triplets=kind,
                                             **({"distance": dist} if dist else {}))
    fused = make("TripletMarginLoss", dict(kw, miner=miner), "cuda")
    ref = make("TripletMarginLoss", kw, "reference")
    assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y, miner(e, y)), x)


@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("kind", [0, 1, 2, 3])
@pytest.mark.parametrize("chunk", [1, 9, 64])
@pytest.mark.parametrize("classes", [2, 9])  # the CPU op's search path (> 64 positives), dense
def test_triplet_mined_op_equals_the_cpu_op(smooth, kind, chunk, classes):
    g = torch.Generator().manual_seed(chunk * 7 + kind)
    x = F.normalize(torch.randn(150, 5, dtype=torch.float64, generator=g), dim=1)
    y = torch.randint(0, classes, (150,), generator=g)
    gr = torch.rand(150, dtype=torch.float64, generator=g)
    op = torch.ops.metrix_ops
    for cosine in (True, False):
        args = (True, cosine, 0.1, kind, 0.15, smooth, chunk)
        cpu = op.triplet_mined_fwd(x, x, y, y, *args)
        dev = op.triplet_mined_fwd(x.cuda(), x.cuda(), y.cuda(), y.cuda(), *args)
        for a, b in zip(dev, cpu):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-12)
        cpu = op.triplet_mined_bwd(gr, x, x, y, y, *args)
        dev = op.triplet_mined_bwd(gr.cuda(), x.cuda(), x.cuda(), y.cuda(), y.cuda(), *args)
        for a, b in zip(dev, cpu):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-12)


def test_explicit_cuda_runs_the_cuda_ops():
    x = torch.randn(16, 8, device="cuda", dtype=torch.float64)
    y = torch.randint(0, 3, (16,), device="cuda")
    with MetrixOpCalls() as seen:
        for name in ("TripletMarginLoss", "HPHNTripletLoss", "LiftedStructureLoss"):
            out = make(name, {}, "cuda")(x, y)
            torch.testing.assert_close(out, make(name, {}, "reference")(x, y))
        miner = mo.miners.MultiSimilarityMiner(0.1)
        out = mo.losses.MultiSimilarityLoss(backend="cuda", miner=miner)(x, y)
        torch.testing.assert_close(
            out, make("MultiSimilarityLoss", {}, "reference")(x, y, miner(x, y)))
    # the batch against itself of the mined MS loss takes its self op where built
    first = ["triplet_all_fwd", "ee_hphn_mine", "lifted_fwd"]
    assert [op for op, _ in seen.calls] in (first + ["ms_mined_fwd"],
                                            first + ["ms_mine_bounds_self", "ms_mined_self_fwd"])
    assert {dev for _, dev in seen.calls} == {"cuda"}


def test_hphn_with_expansion_on_the_cuda_engine():
    """EE-HPHN on the CUDA engine searches the synthetic points with its own op
    (ee_point_mine); the pair-mining op has no EE search and refuses segments by name."""
    x = torch.randn(8, 4, device="cuda", dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3], device="cuda")
    ee = mo.Expansion(n_points=2)
    with MetrixOpCalls() as seen:
        out = mo.losses.HPHNTripletLoss(backend="cuda", expansion=ee)(x, y)
    assert ("ee_point_mine", "cuda") in seen.calls
    torch.testing.assert_close(out, mo.losses.HPHNTripletLoss(backend="reference",
                                                              expansion=ee)(x, y))
    seg = torch.tensor([0], device="cuda")
    with pytest.raises(RuntimeError, match="Triton engine"):
        torch.ops.metrix_ops.ee_hphn_mine(F.normalize(x, dim=1), y, seg, seg + 1, 2, 8)
    # n_points = 0: the segments carry no point but are checked, as the CPU op checks them
    xu = F.normalize(x, dim=1)
    no_points = torch.ops.metrix_ops.ee_hphn_mine(xu, y, seg, seg + 1, 0, 8)
    torch.testing.assert_close(no_points, torch.ops.metrix_ops.ee_hphn_mine(
        xu, y, NO_EMPTY.cuda(), NO_EMPTY.cuda(), 0, 8))
    with pytest.raises(RuntimeError, match="different labels"):
        torch.ops.metrix_ops.ee_hphn_mine(xu, y, seg + 1, seg + 2, 0, 8)


@pytest.mark.parametrize("cosine", [True, False])
def test_opcheck(cosine):
    x = F.normalize(torch.randn(9, 5, dtype=torch.float64, device="cuda"), dim=1)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3, 3], device="cuda")
    args = (x.requires_grad_(True), x.detach().clone().requires_grad_(True), y, y, True, cosine,
            0.1, 4)
    torch.library.opcheck(torch.ops.metrix_ops.triplet_all_fwd.default, args)
    hn, hp = torch.ops.metrix_ops.ms_mine_bounds(x.detach(), x.detach(), y, y, True, 4)
    torch.library.opcheck(torch.ops.metrix_ops.ms_mined_fwd.default,
                          args[:4] + (hn, hp, True, 2.0, 50.0, 0.5, 0.1, 4))
    torch.library.opcheck(torch.ops.metrix_ops.lifted_fwd.default,
                          args[:4] + (torch.arange(9, device="cuda"), True, cosine, 0.0, 0.8, 0.0,
                                      float("inf"), 4))


def test_bad_input_names_the_argument():
    x = F.normalize(torch.randn(6, 4, device="cuda"), dim=1)
    y = torch.randint(0, 2, (6,), device="cuda")
    with pytest.raises(RuntimeError, match="ref_labels"):
        torch.ops.metrix_ops.triplet_all_fwd(x, x, y, y[:3], True, True, 0.1, 8)
    with pytest.raises(RuntimeError, match="one device"):
        torch.ops.metrix_ops.triplet_all_fwd(x, x, y, y.cpu(), True, True, 0.1, 8)
    with pytest.raises(RuntimeError, match="margin"):
        torch.ops.metrix_ops.triplet_all_fwd(x, x, y, y, True, True, float("nan"), 8)
    with pytest.raises(RuntimeError, match="labels"):
        torch.ops.metrix_ops.ee_hphn_mine(x, y[:4], NO_EMPTY.cuda(), NO_EMPTY.cuda(), 0, 8)
    with pytest.raises(RuntimeError, match="mine_kind"):
        torch.ops.metrix_ops.triplet_mined_fwd(x, x, y, y, True, True, 0.1, 7, 0.2, False, 8)
    with pytest.raises(RuntimeError, match="hardest_neg"):
        torch.ops.metrix_ops.ms_mined_fwd(x, x, y, y, y.double(), y.double(), True, 2.0, 50.0,
                                          0.5, 0.1, 8)
    ys, p = y.sort().values, torch.arange(6, device="cuda")
    inf = float("inf")
    with pytest.raises(RuntimeError, match="labels must be sorted"):
        torch.ops.metrix_ops.lifted_fwd(x, x, ys.flip(0), ys, p, True, True, 0.0, 1.0, -inf, inf, 8)
    with pytest.raises(RuntimeError, match="partner must be in"):
        torch.ops.metrix_ops.lifted_fwd(x, x, ys, ys, p + 1, True, True, 0.0, 1.0, -inf, inf, 8)
