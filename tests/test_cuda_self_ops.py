"""The CUDA engine's ops of the batch against itself (csrc/cuda: ms_loss_self, ms_mine_bounds_self
and ms_mined_self, contrastive_self, circle_self, gen_lifted_self, supcon_self, ntxent_self; S's
symmetric blocks, cuda/pair_rows.cuh's fold_self and grad_self) against the CPU self ops
(checked against the reference in the CPU tests) and against the CUDA general ops with r = x,
whose dx + dr is the same gradient taken the other way; then the losses routed through them
against the reference. Blocks of a few rows make several block rows, a partial last block and
the off-diagonal blocks' column folds and transposed products; blocks past 256 rows split the
column fold into segments. Skipped without a GPU and the compiled CUDA kernels."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import metrix_ops as mo
from cases import CASE_IDS, CASES, assert_close_vg, make_case
from cuda_emu.plugin import emulating
from metrix_ops import _ext
from metrix_ops.fused import multi_similarity as ms_glue

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and _ext.HAS_CUDA_EXT),
                                reason="needs a CUDA device and the compiled CUDA kernels")

ops = torch.ops.metrix_ops if _ext.HAS_EXT else None
INF = math.inf
ENGINE = "cuda"  # the loss-level tests' backend


@pytest.fixture(autouse=True)
def _fp32_products(no_tf32):  # conftest.py
    pass


def _inputs(b, classes, seed):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(b, 6, dtype=torch.float64, generator=g), dim=1)
    if b > 20:
        x[17] = x[4]  # duplicate rows: s = 1 off the diagonal
    y = torch.randint(0, classes, (b,), generator=g)
    if b > 30:
        y[30] = classes + 5  # a row without positives
    return x, y, g


def _close(dev, cpu):
    if isinstance(cpu, torch.Tensor):
        dev, cpu = (dev,), (cpu,)
    for a, b in zip(dev, cpu):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-12)


# (self op stem, the forward's hyper-parameters after labels, the general op's stem, its
# hyper-parameters after exclude_diag)
TWO_SIDE = [
    ("ms_loss_self", (2.0, 50.0, 0.5), "ms_loss", (2.0, 50.0, 0.5)),
    ("ms_loss_self", (1.3, 20.0, 0.3), "ms_loss", (1.3, 20.0, 0.3)),
    ("circle_self", (0.25, 64.0), "circle", (0.25, 64.0)),
    ("gen_lifted_self", (False, 0.0, 1.0), "gen_lifted", (False, 0.0, 1.0)),
    ("gen_lifted_self", (True, 0.9, 0.2), "gen_lifted", (True, 0.9, 0.2)),
]


# blocks past 256 rows (fold_cols_kernel's segments): two and three segments per column
# merged, each block row a full diagonal block and a short partial one; on a GPU also several
# full blocks of them (on the emulator, whose time grows with B², 1100 rows in 520-row blocks
# took 6 min of the suite's 2-core time)
BLOCKS = [(0, 4), (1, 4), (37, 5), (37, 64), (130, 16), (130, 50), (330, 300), (560, 520)]
if not emulating():
    BLOCKS += [(600, 300), (1100, 520)]


@pytest.mark.parametrize("stem,hyper,general,ghyper", TWO_SIDE,
                         ids=["ms", "ms_kw", "circle", "gen_lifted", "gen_lifted_cos"])
@pytest.mark.parametrize("b,block", BLOCKS)
def test_two_side_self_ops(stem, hyper, general, ghyper, b, block):
    x, y, g = _inputs(b, 5, b + block)
    fwd, bwd = getattr(ops, stem + "_fwd"), getattr(ops, stem + "_bwd")
    cpu = fwd(x, y, *hyper, block)
    dev = fwd(x.cuda(), y.cuda(), *hyper, block)
    _close(dev, cpu)
    grad = torch.rand(b, dtype=torch.float64, generator=g)
    if b:
        grad[b // 2] = 0  # a row whose gradient is skipped
    dx_cpu = bwd(grad, x, y, cpu[1], cpu[2], *hyper, block)
    dx = bwd(grad.cuda(), x.cuda(), y.cuda(), dev[1], dev[2], *hyper, block)
    _close(dx, dx_cpu)
    # the general op with r = x: the same rows, and dx + dr the same gradient
    xc, yc = x.cuda(), y.cuda()
    chunk = max(block // 2, 1)
    gen = getattr(ops, general + "_fwd")(xc, xc, yc, yc, True, *ghyper, chunk)
    _close(dev, tuple(t.cpu() for t in gen))
    extra = (True,) if general == "circle" else ()  # circle_bwd's need_dr
    dxg, drg = getattr(ops, general + "_bwd")(grad.cuda(), xc, xc, yc, yc, gen[1], gen[2], True,
                                              *ghyper, chunk, *extra)
    _close(dx, (dxg + drg).cpu())


@pytest.mark.parametrize("b,block", BLOCKS)
@pytest.mark.parametrize("cosine,pm,nm", [(False, 0.0, 1.0), (False, 0.1, 0.7), (True, 0.9, 0.4)])
def test_contrastive_self_ops(b, block, cosine, pm, nm):
    x, y, g = _inputs(b, 5, 3 * b + block)
    hyper = (cosine, pm, nm, 0.0, INF)  # AvgNonZero's window: terms > 0
    cpu = ops.contrastive_self_fwd(x, y, *hyper, block)
    dev = ops.contrastive_self_fwd(x.cuda(), y.cuda(), *hyper, block)
    _close(dev, cpu)
    gp = torch.rand(b, dtype=torch.float64, generator=g)
    gn = torch.rand(b, dtype=torch.float64, generator=g)
    dx_cpu = ops.contrastive_self_bwd(gp, gn, x, y, *hyper, block)
    dx = ops.contrastive_self_bwd(gp.cuda(), gn.cuda(), x.cuda(), y.cuda(), *hyper, block)
    _close(dx, dx_cpu)
    xc, yc = x.cuda(), y.cuda()
    _close(dev, tuple(t.cpu() for t in ops.contrastive_fwd(xc, xc, yc, yc, True, *hyper, 7)))
    dxg, drg = ops.contrastive_bwd(gp.cuda(), gn.cuda(), xc, xc, yc, yc, True, *hyper, 7)
    _close(dx, (dxg + drg).cpu())


@pytest.mark.parametrize("b,block", BLOCKS)
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_supcon_self_ops(b, block, temperature):
    x, y, g = _inputs(b, 5, 7 * b + block)
    cpu = ops.supcon_self_fwd(x, y, temperature, block)
    dev = ops.supcon_self_fwd(x.cuda(), y.cuda(), temperature, block)
    _close(dev, cpu)
    grad = torch.rand(b, dtype=torch.float64, generator=g)
    dx_cpu = ops.supcon_self_bwd(grad, x, y, cpu[1], temperature, block)
    dx = ops.supcon_self_bwd(grad.cuda(), x.cuda(), y.cuda(), dev[1], temperature, block)
    _close(dx, dx_cpu)
    xc, yc = x.cuda(), y.cuda()
    gen = ops.supcon_fwd(xc, xc, yc, yc, True, temperature, 7)
    _close(dev, tuple(t.cpu() for t in gen))
    dxg, drg = ops.supcon_bwd(grad.cuda(), xc, xc, yc, yc, gen[1], True, temperature, 7, True)
    _close(dx, (dxg + drg).cpu())


@pytest.mark.parametrize("b,block", BLOCKS)
# (low, high): the reducer's window on a pair's loss, which decides the kept pairs and w_total
@pytest.mark.parametrize("temperature,low,high", [(0.07, -INF, INF), (0.5, 0.0, INF),
                                                  (0.5, 0.0, 2.0)])
def test_ntxent_self_ops(b, block, temperature, low, high):
    x, y, g = _inputs(b, 5, 9 * b + block)
    hyper = (temperature, low, high)
    cpu = ops.ntxent_self_fwd(x, y, *hyper, block)
    dev = ops.ntxent_self_fwd(x.cuda(), y.cuda(), *hyper, block)
    _close(dev, cpu)
    grad = torch.rand(b, dtype=torch.float64, generator=g)
    dx_cpu = ops.ntxent_self_bwd(grad, x, y, cpu[2], cpu[3], cpu[4], *hyper, block)
    dx = ops.ntxent_self_bwd(grad.cuda(), x.cuda(), y.cuda(), dev[2], dev[3], dev[4], *hyper,
                             block)
    _close(dx, dx_cpu)
    xc, yc = x.cuda(), y.cuda()
    gen = ops.ntxent_fwd(xc, xc, yc, yc, True, *hyper, 7)
    _close(dev[:4], tuple(t.cpu() for t in gen))
    dxg, drg = ops.ntxent_bwd(grad.cuda(), xc, xc, yc, yc, gen[2], gen[3], True, *hyper, 7, True)
    _close(dx, (dxg + drg).cpu())


@pytest.mark.parametrize("b,block", BLOCKS)
def test_ms_mined_self_ops(b, block):
    x, y, g = _inputs(b, 4, 5 * b + block)
    hn, hp = ops.ms_mine_bounds_self(x, y, block)
    hn_d, hp_d = ops.ms_mine_bounds_self(x.cuda(), y.cuda(), block)
    _close((hn_d, hp_d), (hn, hp))
    hyper = (2.0, 50.0, 0.5, 0.1)
    cpu = ops.ms_mined_self_fwd(x, y, hn, hp, *hyper, block)
    dev = ops.ms_mined_self_fwd(x.cuda(), y.cuda(), hn_d, hp_d, *hyper, block)
    _close(dev, cpu)
    grad = torch.rand(b, dtype=torch.float64, generator=g)
    dx_cpu = ops.ms_mined_self_bwd(grad, x, y, cpu[1], cpu[2], hn, hp, *hyper, block)
    dx = ops.ms_mined_self_bwd(grad.cuda(), x.cuda(), y.cuda(), dev[1], dev[2], hn_d, hp_d,
                               *hyper, block)
    _close(dx, dx_cpu)
    xc, yc = x.cuda(), y.cuda()  # the CUDA general ops with r = x
    _close((hn_d, hp_d), tuple(t.cpu() for t in ops.ms_mine_bounds(xc, xc, yc, yc, True, 7)))
    gen = ops.ms_mined_fwd(xc, xc, yc, yc, hn_d, hp_d, True, *hyper, 7)
    _close(dev, tuple(t.cpu() for t in gen))
    dxg, drg = ops.ms_mined_bwd(grad.cuda(), xc, xc, yc, yc, gen[1], gen[2], hn_d, hp_d, True,
                                *hyper, 7)
    _close(dx, (dxg + drg).cpu())


def test_warp_row_fold_with_a_row_offset():
    """Blocks of more than 32 rows per multiprocessor take fold_rows_kernel's warp-per-row
    form (4224 rows on an H100 or H200, from the second block row on at a row offset)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    block = 32 * sms + 76
    x, y, g = _inputs(2 * block + 24, 50, 11)
    dev = ops.ms_loss_self_fwd(x.cuda(), y.cuda(), 2.0, 50.0, 0.5, block)
    _close(dev, ops.ms_loss_self_fwd(x, y, 2.0, 50.0, 0.5, 1024))


def test_self_ops_gradcheck():
    """fp64 finite differences through the registered autograd, three blocks a side (not
    Circle: its weights [1 + m − s]₊, [s + m]₊ are constants to the gradient, as PML's)."""
    x, y, _ = _inputs(11, 3, 0)
    xc = x.cuda().requires_grad_(True)
    yc = y.cuda()
    torch.autograd.gradcheck(lambda e: ops.ms_loss_self_fwd(e, yc, 2.0, 10.0, 0.5, 4)[0], (xc,))
    torch.autograd.gradcheck(lambda e: ops.gen_lifted_self_fwd(e, yc, False, 0.0, 1.0, 4)[0],
                             (xc,))
    torch.autograd.gradcheck(
        lambda e: ops.contrastive_self_fwd(e, yc, False, 0.0, 1.0, 0.0, INF, 4)[0], (xc,))
    torch.autograd.gradcheck(lambda e: ops.supcon_self_fwd(e, yc, 0.5, 4)[0], (xc,))
    torch.autograd.gradcheck(lambda e: ops.ntxent_self_fwd(e, yc, 0.5, -INF, INF, 4)[0], (xc,))


@pytest.mark.parametrize("op", ["ms_loss_self_fwd", "circle_self_fwd", "gen_lifted_self_fwd",
                                "contrastive_self_fwd", "ms_mined_self_fwd", "supcon_self_fwd",
                                "ntxent_self_fwd"])
def test_opcheck(op):
    x, y, _ = _inputs(13, 3, 2)
    x, y = x.cuda().requires_grad_(True), y.cuda()
    hyper = {"ms_loss_self_fwd": (2.0, 50.0, 0.5), "circle_self_fwd": (0.25, 64.0),
             "gen_lifted_self_fwd": (False, 0.1, 0.9),
             "contrastive_self_fwd": (False, 0.0, 1.0, 0.0, INF), "supcon_self_fwd": (0.1,),
             "ntxent_self_fwd": (0.1, -INF, INF)}
    if op == "ms_mined_self_fwd":
        hn, hp = ops.ms_mine_bounds_self(x.detach(), y, 4)
        args = (x, y, hn, hp, 2.0, 50.0, 0.5, 0.1, 4)
    else:
        args = (x, y, *hyper[op], 4)
    torch.library.opcheck(getattr(ops, op).default, args)


def test_bad_block():
    x, y, _ = _inputs(9, 3, 1)
    with pytest.raises(RuntimeError, match="block must be > 0"):
        ops.ms_loss_self_fwd(x.cuda(), y.cuda(), 2.0, 50.0, 0.5, 0)


class _OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


LOSSES = [
    ("MultiSimilarityLoss", {}, "ms_loss_self_fwd"),
    ("MultiSimilarityLoss", {"miner": "ms"}, "ms_mined_self_fwd"),
    ("ContrastiveLoss", {}, "contrastive_self_fwd"),
    ("ContrastiveLoss", {"pos_margin": 0.1, "neg_margin": 0.7}, "contrastive_self_fwd"),
    ("CircleLoss", {}, "circle_self_fwd"),
    ("GeneralizedLiftedStructureLoss", {}, "gen_lifted_self_fwd"),
    ("SupConLoss", {}, "supcon_self_fwd"),
    ("NTXentLoss", {}, "ntxent_self_fwd"),
]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("name,kw,op", LOSSES,
                         ids=["ms", "ms_miner", "con", "con_kw", "circle", "gen_lifted",
                              "supcon", "ntxent"])
def test_losses_through_self_ops(monkeypatch, case, name, kw, op):
    monkeypatch.setattr(ms_glue, "CUDA_SELF_BLOCK", 8)
    kw = dict(kw)
    if kw.get("miner") == "ms":
        kw["miner"] = mo.miners.MultiSimilarityMiner(0.1)
    x, y = make_case(case, torch.float64)
    x, y = x.detach().cuda(), y.cuda()
    fused = getattr(mo.losses, name)(backend=ENGINE, **kw)
    ref = getattr(mo.losses, name)(backend="reference", **kw)
    assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x, rtol=1e-6, atol=1e-9)
    if len(x):
        with _OpNames() as seen:
            fused(x.clone().requires_grad_(True), y).backward()
        assert op in seen.names, sorted(seen.names)
