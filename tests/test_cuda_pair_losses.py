"""backend="cuda" (csrc/cuda/*_cuda.cu on the row-chunk engine csrc/cuda/pair_rows.cuh:
MultiSimilarity, Contrastive, Circle, NTXent, SupCon, ProxyAnchor, ProxyNCA,
GeneralizedLiftedStructure, NPairs on the ProxyNCA op) against the
reference on the same device: values and gradients over the shared cases, chunk boundaries,
ref_emb, reducers; opcheck; bad input. Skipped without a GPU and the compiled CUDA kernels; the per-pair math they run
is the headers the CPU tests check (common/lse_acc.h, contrastive.h, circle.h, ntxent.h,
proxy_anchor.h, proxy_nca.h, lifted.h)."""
import pytest
import torch
import torch.nn.functional as F

import metrix_ops as mo
from cases import (CASES, CASE_IDS, FP32_GRAD, MetrixOpCalls, OWN_ROWS_LOSSES, assert_close_vg,
                   check_own_rows_with_gradient, make_case)
from metrix_ops import _ext
from metrix_ops.distances import CosineSimilarity
from metrix_ops.reducers import MeanReducer

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and _ext.HAS_CUDA_EXT),
                                reason="needs a CUDA device and the compiled CUDA kernels")

LOSSES = [
    ("MultiSimilarityLoss", {}),
    ("MultiSimilarityLoss", {"alpha": 1.3, "beta": 20.0, "base": 0.3}),
    ("ContrastiveLoss", {}),
    ("ContrastiveLoss", {"pos_margin": 0.1, "neg_margin": 0.7}),
    ("ContrastiveLoss", {"distance": "cosine", "pos_margin": 0.9, "neg_margin": 0.4}),
    ("CircleLoss", {}),
    ("CircleLoss", {"m": 0.25, "gamma": 64.0}),
    ("NTXentLoss", {}),
    ("NTXentLoss", {"temperature": 0.5}),
    ("SupConLoss", {}),
    ("SupConLoss", {"temperature": 0.3}),
    ("GeneralizedLiftedStructureLoss", {}),
    ("GeneralizedLiftedStructureLoss", {"distance": "cosine", "pos_margin": 0.9,
                                        "neg_margin": 0.2}),
]
LOSS_IDS = ["ms", "ms_kw", "con", "con_kw", "con_cos", "circle", "circle_kw", "ntxent",
            "ntxent_t", "supcon", "supcon_t", "gen_lifted", "gen_lifted_cos"]
# the batch against itself only (PML's N-pairs takes no ref_emb): the shared cases
BATCH_ONLY = [("NPairsLoss", {})]


@pytest.fixture(autouse=True)
def _fp32_products(no_tf32):  # conftest.py
    pass


def pair(name, kw, **extra):
    kw = dict(kw, **extra)
    if kw.get("distance") == "cosine":
        kw["distance"] = CosineSimilarity()
    return getattr(mo.losses, name)(backend="cuda", **kw), getattr(mo.losses, name)(
        backend="reference", **kw)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("name,kw", LOSSES + BATCH_ONLY, ids=LOSS_IDS + ["npairs"])
@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float64, 1e-6, 1e-9),
                                             (torch.float32, 1e-4, 1e-5)])
def test_matches_reference(case, name, kw, dtype, rtol, atol):
    x, y = make_case(case, dtype)
    x, y = x.detach().cuda(), y.cuda()
    fused, ref = pair(name, kw)
    assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x, rtol=rtol, atol=atol,
                    grad_atol_of_max=FP32_GRAD[dtype])


@pytest.mark.parametrize("name,kw", LOSSES, ids=LOSS_IDS)
def test_ref_emb_and_reducer(name, kw):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(29, 9, dtype=torch.float64, generator=g).cuda()
    r = torch.randn(41, 9, dtype=torch.float64, generator=g).cuda()
    y = torch.randint(0, 5, (29,), generator=g).cuda()
    yr = torch.randint(0, 5, (41,), generator=g).cuda()
    reducer = MeanReducer()
    fused, ref = pair(name, kw, reducer=reducer)
    assert_close_vg(lambda e, f: fused(e, y, ref_emb=f, ref_labels=yr),
                    lambda e, f: ref(e, y, ref_emb=f, ref_labels=yr), x, r)


@pytest.mark.parametrize("name,kw", LOSSES[::2], ids=LOSS_IDS[::2])
def test_warp_per_row_fold_at_large_batch(name, kw):
    """From 32 rows per multiprocessor on, the fold takes one warp per row (pair_rows.cuh)
    instead of one block: a batch just past that, and a ref_emb one row short of it, against
    the fused CPU op in fp64 (itself checked against the reference in the CPU tests; the
    reference's NTXent would hold a positive-pairs × negatives matrix of 300 GB here)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    b = 32 * sms + 7
    g = torch.Generator().manual_seed(b)
    x = torch.randn(b, 12, dtype=torch.float64, generator=g).cuda()
    y = torch.randint(0, b // 4, (b,), generator=g).cuda()  # about 4 per class
    kw = dict(kw, distance=CosineSimilarity()) if kw.get("distance") == "cosine" else kw
    fused = getattr(mo.losses, name)(backend="cuda", **kw)
    cpu = getattr(mo.losses, name)(backend="cpu", **kw)
    yc = y.cpu()
    assert_close_vg(lambda e: fused(e, y), lambda e: cpu(e.cpu(), yc).cuda(), x,
                    rtol=1e-6, atol=1e-9)
    r, yr = x[: b - 1].clone(), y[: b - 1].clone()
    assert_close_vg(lambda e, f: fused(e, y, ref_emb=f, ref_labels=yr),
                    lambda e, f: cpu(e.cpu(), yc, ref_emb=f.cpu(), ref_labels=yr.cpu()).cuda(),
                    x, r, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunk_boundaries(chunk):
    """The op's streaming over reference chunks (several kernel launches, partial chunks)."""
    from metrix_ops.ops import ms_loss_rows
    g = torch.Generator().manual_seed(chunk)
    x = F.normalize(torch.randn(37, 6, dtype=torch.float64, generator=g), dim=1)
    y = torch.randint(0, 4, (37,), generator=g)
    cpu = ms_loss_rows(x, x, y, y, True, 2.0, 50.0, 0.5, chunk)
    dev = ms_loss_rows(x.cuda(), x.cuda(), y.cuda(), y.cuda(), True, 2.0, 50.0, 0.5, chunk)
    torch.testing.assert_close(dev.cpu(), cpu, rtol=1e-9, atol=1e-12)


def test_explicit_cuda_runs_the_cuda_op():
    """backend="cuda" runs the op's CUDA kernel (not the reference, not the CPU op): the
    batch against itself takes the self op (ms_loss_self) where the build has its kernel."""
    x = torch.randn(16, 8, device="cuda", dtype=torch.float64)
    y = torch.randint(0, 3, (16,), device="cuda")
    with MetrixOpCalls() as seen:
        out = mo.losses.MultiSimilarityLoss(backend="cuda")(x, y)
    assert seen.calls in ([("ms_loss_self_fwd", "cuda")], [("ms_loss_fwd", "cuda")])
    torch.testing.assert_close(out, mo.losses.MultiSimilarityLoss(backend="reference")(x, y))


@pytest.mark.parametrize("op", ["ms", "con", "gen_lifted"])
def test_opcheck(op):
    x = F.normalize(torch.randn(9, 5, dtype=torch.float64, device="cuda"), dim=1)
    y = torch.randint(0, 3, (9,), device="cuda")
    x.requires_grad_(True)
    if op == "ms":
        args = (x, x.detach().clone().requires_grad_(True), y, y, True, 2.0, 50.0, 0.5, 4)
        torch.library.opcheck(torch.ops.metrix_ops.ms_loss_fwd.default, args)
    elif op == "con":
        args = (x, x.detach().clone().requires_grad_(True), y, y, True, False, 0.0, 1.0, 0.0,
                float("inf"), 4)
        torch.library.opcheck(torch.ops.metrix_ops.contrastive_fwd.default, args)
    else:
        args = (x, x.detach().clone().requires_grad_(True), y, y, True, False, 0.1, 0.9, 4)
        torch.library.opcheck(torch.ops.metrix_ops.gen_lifted_fwd.default, args)


def test_bad_input_names_the_argument():
    x = torch.randn(6, 4, device="cuda")
    y = torch.randint(0, 2, (6,), device="cuda")
    with pytest.raises(RuntimeError, match="ref_labels"):
        torch.ops.metrix_ops.ms_loss_fwd(x, x, y, y[:3], True, 2.0, 50.0, 0.5, 8)
    with pytest.raises(RuntimeError, match="one device"):
        torch.ops.metrix_ops.ms_loss_fwd(x, x, y, y.cpu(), True, 2.0, 50.0, 0.5, 8)


def proxy_fn(name, C, D, backend, **kw):
    """f(y) -> (e, P) -> loss, the proxies an input so their gradient is compared too."""
    from torch.func import functional_call
    mod = getattr(mo.losses, name)(C, D, backend=backend, **kw).cuda()
    return lambda y: lambda e, P: functional_call(mod, {"proxies": P}, (e, y))


@pytest.mark.parametrize("name,kw", [("ProxyAnchorLoss", {}),
                                     ("ProxyAnchorLoss", {"margin": 0.25, "alpha": 16.0}),
                                     ("ProxyNCALoss", {}),
                                     ("ProxyNCALoss", {"softmax_scale": 3.0}),
                                     ("ProxyNCALoss", {"distance": "cosine"})])
@pytest.mark.parametrize("B,C,D", [(1, 1, 3), (37, 5, 17), (300, 101, 64), (12, 7, 6)])
@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float64, 1e-6, 1e-9),
                                             (torch.float32, 1e-4, 1e-5)])
def test_proxy_losses_match_reference(name, kw, B, C, D, dtype, rtol, atol):
    kw = dict(kw)
    if kw.get("distance") == "cosine":
        kw["distance"] = CosineSimilarity()
    g = torch.Generator().manual_seed(B * 1000 + C)
    x = torch.randn(B, D, generator=g, dtype=torch.float64).to("cuda", dtype)
    P = torch.randn(C, D, generator=g, dtype=torch.float64).to("cuda", dtype)
    y = torch.randint(0, min(C, 4), (B,), generator=g).cuda()  # some classes absent
    assert_close_vg(proxy_fn(name, C, D, "cuda", **kw)(y),
                    proxy_fn(name, C, D, "reference", **kw)(y), x, P, rtol=rtol, atol=atol,
                    grad_atol_of_max=FP32_GRAD[dtype])


@pytest.mark.gpu_only  # the Triton engine does not take the emulator's CUDA tensors
def test_auto_follows_the_measured_gpu_order(monkeypatch):
    """backend="auto" on CUDA tensors takes the first engine of the loss's GPU order."""
    dev = torch.device("cuda")
    monkeypatch.setitem(mo.backend.GPU_ORDER, "MultiSimilarityLoss",
                        ((None, ("cuda", "triton")),))
    assert mo.backend.resolve("auto", "MultiSimilarityLoss", dev) == "cuda"
    monkeypatch.setitem(mo.backend.GPU_ORDER, "MultiSimilarityLoss",
                        ((None, ("triton", "cuda")),))
    assert mo.backend.resolve("auto", "MultiSimilarityLoss", dev) == "triton"


@pytest.mark.parametrize("name", [n for n in OWN_ROWS_LOSSES if n != "TripletMarginLoss"])
def test_own_rows_path_with_references_that_carry_gradient(name):
    """The distributed wrapper's efficient path (and CrossBatchMemory's) on this engine, with
    the gathered references carrying the batch's gradient (cases.py)."""
    check_own_rows_with_gradient("cuda", lambda *ts: tuple(t.cuda() for t in ts), name)
