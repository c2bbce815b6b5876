"""Repeatability: the same call on the same inputs gives the same bits, value and gradient,
on every engine, for every loss, with Metrix, EE, a miner and a bank (CrossBatchMemory). The
engines accumulate without atomics (one writer per output entry, fixed merge orders), so
this holds with the default settings and under torch.use_deterministic_algorithms(True).
The exceptions raise there, as torch's own nondeterministic kernels do: the Triton
index-tuple backward (test_triton_pair_sims.py) and the CUDA engine's TripletMarginLoss
backward with smooth_loss (float atomics per rank; checked here on a GPU).

The CPU engine is repeatable for a given thread count (its row blocks are fixed by the
count); the Triton engine runs here under the interpreter, on a GPU it runs there."""
import pytest
import torch

import metrix_ops as mo
from metrix_ops import _ext
from metrix_ops.triton import usable_on

L, mi = mo.losses, mo.miners

CASES = {
    "ms": lambda b: L.MultiSimilarityLoss(backend=b),
    "contrastive": lambda b: L.ContrastiveLoss(backend=b),
    "circle": lambda b: L.CircleLoss(backend=b),
    "ntxent": lambda b: L.NTXentLoss(backend=b),
    "supcon": lambda b: L.SupConLoss(backend=b),
    "lifted": lambda b: L.LiftedStructureLoss(backend=b),
    "generalized-lifted": lambda b: L.GeneralizedLiftedStructureLoss(backend=b),
    "triplet": lambda b: L.TripletMarginLoss(backend=b),
    "hphn": lambda b: L.HPHNTripletLoss(backend=b),
    "npairs": lambda b: L.NPairsLoss(backend=b),
    "proxy-anchor": lambda b: L.ProxyAnchorLoss(6, 24, backend=b),
    "proxy-nca": lambda b: L.ProxyNCALoss(6, 24, backend=b),
    "ms-metrix": lambda b: L.MultiSimilarityLoss(metrix=mo.Metrix(), backend=b),
    "contrastive-metrix": lambda b: L.ContrastiveLoss(metrix=mo.Metrix(), backend=b),
    "proxy-anchor-metrix": lambda b: L.ProxyAnchorLoss(6, 24, metrix=mo.Metrix(), backend=b),
    "ms-ee": lambda b: L.MultiSimilarityLoss(expansion=mo.Expansion(n_points=3), backend=b),
    "hphn-ee": lambda b: L.HPHNTripletLoss(expansion=mo.Expansion(n_points=3), backend=b),
    "ms-miner": lambda b: L.MultiSimilarityLoss(miner=mi.MultiSimilarityMiner(), backend=b),
    "triplet-semihard": lambda b: L.TripletMarginLoss(
        miner=mi.TripletMarginMiner(type_of_triplets="semihard"), backend=b),
    "bank": lambda b: L.CrossBatchMemory(L.ContrastiveLoss(backend=b), 24, memory_size=50),
}


def _one_run(make, backend, x, y):
    torch.manual_seed(11)  # the same proxies and the same Metrix λ draw
    loss_fn = make(backend).to(x.device)
    xx = x.clone().requires_grad_()
    value = loss_fn(xx, y)
    value.backward()
    return value.detach(), xx.grad


def _assert_repeatable(case, backend, device):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(45, 24, generator=g).to(device)
    y = torch.randint(0, 6, (45,), generator=g).to(device)
    runs = [_one_run(CASES[case], backend, x, y) for _ in range(2)]
    (v0, g0), (v1, g1) = runs
    assert torch.isfinite(v0) and v0.item() != 0.0  # a real loss, not the no-pairs zero
    assert torch.equal(v0, v1), f"{case}: values differ by {(v0 - v1).abs().item():.3g}"
    assert torch.equal(g0, g1), f"{case}: gradients differ by {(g0 - g1).abs().max():.3g}"


@pytest.fixture
def deterministic_mode():
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(old)


@pytest.mark.parametrize("case", sorted(CASES))
def test_cpu_engine_repeats_bitwise(case, deterministic_mode):
    _assert_repeatable(case, "cpu", torch.device("cpu"))


@pytest.mark.skipif(not usable_on(torch.device("cpu")), reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("case", ["ms", "contrastive", "triplet", "proxy-anchor", "ms-metrix",
                                  "ms-ee", "hphn-ee", "bank"])
def test_triton_engine_repeats_bitwise_on_the_interpreter(case, deterministic_mode):
    _assert_repeatable(case, "triton", torch.device("cpu"))


on_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@on_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_gpu_engines_repeat_bitwise(case, backend, deterministic_mode):
    if backend == "cuda" and not _ext.HAS_CUDA_EXT:
        pytest.skip("the CUDA kernels are not built")
    if backend == "triton" and not usable_on(torch.device("cuda")):
        pytest.skip("Triton cannot run on CUDA tensors here")
    _assert_repeatable(case, backend, torch.device("cuda"))


@on_gpu
@pytest.mark.skipif(not _ext.HAS_CUDA_EXT, reason="the CUDA kernels are not built")
def test_cuda_smooth_triplet_backward_refuses_deterministic_mode(deterministic_mode):
    x = torch.randn(20, 8, device="cuda", requires_grad=True)
    y = torch.randint(0, 3, (20,), device="cuda")
    loss = L.TripletMarginLoss(smooth_loss=True, backend="cuda")(x, y)
    with pytest.raises(RuntimeError, match="smooth_loss"):
        loss.backward()
