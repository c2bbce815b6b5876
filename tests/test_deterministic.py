"""Repeatability: the same call on the same inputs gives the same bits, value and gradient,
on every engine, for every loss, with Metrix, EE, a miner and a bank (CrossBatchMemory),
under torch.use_deterministic_algorithms(True). The fused kernels accumulate without atomics
(one writer per output entry, fixed merge orders); on a GPU the PyTorch glue around them has
ops that add with atomics by default (index_add_, index_select's backward), which take their
deterministic algorithms in that mode. Two kernels add with float atomics and alert there,
as torch's own nondeterministic kernels do: the Triton index-tuple backward
(test_triton_pair_sims.py) and the CUDA engine's TripletMarginLoss backward with
smooth_loss, which backend="auto" then leaves for the next engine that covers it (Triton,
else the reference; checked here on a GPU).

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


def _assert_repeatable(case, backend, device, b=45):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(b, 24, generator=g).to(device)
    y = torch.randint(0, 6, (b,), generator=g).to(device)
    runs = [_one_run(CASES[case], backend, x, y) for _ in range(2)]
    (v0, g0), (v1, g1) = runs
    assert torch.isfinite(v0) and v0.item() != 0.0  # a real loss, not the no-pairs zero
    assert torch.equal(v0, v1), f"{case}: values differ by {(v0 - v1).abs().item():.3g}"
    assert torch.equal(g0, g1), f"{case}: gradients differ by {(g0 - g1).abs().max():.3g}"


@pytest.fixture
def deterministic_mode():
    old = (torch.are_deterministic_algorithms_enabled(),
           torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(old[0], warn_only=old[1])


@pytest.mark.parametrize("case", sorted(CASES))
def test_cpu_engine_repeats_bitwise(case, deterministic_mode):
    _assert_repeatable(case, "cpu", torch.device("cpu"))


@pytest.mark.skipif(not usable_on(torch.device("cpu")), reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("case", ["ms", "contrastive", "triplet", "proxy-anchor", "ms-metrix",
                                  "ms-ee", "hphn-ee", "bank"])
def test_triton_engine_repeats_bitwise_on_the_interpreter(case, deterministic_mode):
    _assert_repeatable(case, "triton", torch.device("cpu"), b=20)  # (the interpreter is slow)


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
def test_cuda_smooth_triplet_under_deterministic_mode(deterministic_mode):
    """The CUDA op's float atomics: "auto" takes the next engine (bitwise repeatable), an
    explicit backend="cuda" refuses the call; with warn_only the op runs, its backward warns,
    and its values are that engine's."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(20, 8, generator=g).cuda()
    y = torch.randint(0, 3, (20,), generator=g).cuda()
    make = lambda b: L.TripletMarginLoss(smooth_loss=True, backend=b)  # noqa: E731
    (v0, g0), (v1, g1) = [_one_run(make, "auto", x, y) for _ in range(2)]
    assert torch.equal(v0, v1) and torch.equal(g0, g1)
    with pytest.raises(NotImplementedError, match="does not cover"):
        make("cuda")(x, y)
    torch.use_deterministic_algorithms(True, warn_only=True)
    xx = x.clone().requires_grad_()
    loss = make("cuda")(xx, y)
    with pytest.warns(UserWarning, match="smooth_loss"):
        loss.backward()
    torch.testing.assert_close(loss.detach(), v0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xx.grad, g0, rtol=1e-4, atol=1e-6)
