"""A miner given to a loss (the option miner=) keeps PML's counts (num_triplets,
num_pos_pairs, num_neg_pairs) when its rule runs inside a fused op, as after PML's two calls
`loss(x, y, miner(x, y))`: our miners and PML's, on every engine here (the Triton engine under
TRITON_INTERPRET=1 without a GPU, the CUDA one on a GPU)."""
import pytest
import torch
from pytorch_metric_learning import miners as pm

import metrix_ops as mo
import metrix_ops.triton as mt
from metrix_ops import _ext, fused

NAMES = ("num_triplets", "num_pos_pairs", "num_neg_pairs")
MINERS = {  # name: (loss, ours, PML's)
    "ms": ("MultiSimilarityLoss", lambda: mo.miners.MultiSimilarityMiner(0.2),
           lambda: pm.MultiSimilarityMiner(0.2)),
    "semihard": ("TripletMarginLoss",
                 lambda: mo.miners.TripletMarginMiner(0.3, type_of_triplets="semihard"),
                 lambda: pm.TripletMarginMiner(0.3, type_of_triplets="semihard")),
    "hard": ("TripletMarginLoss", lambda: mo.miners.TripletMarginMiner(0.2, type_of_triplets="hard"),
             lambda: pm.TripletMarginMiner(0.2, type_of_triplets="hard")),
    "batch_hard": ("TripletMarginLoss", mo.miners.BatchHardMiner, pm.BatchHardMiner),
}


def _device(backend):
    if backend == "cuda":
        if not (torch.cuda.is_available() and _ext.HAS_CUDA_EXT):
            pytest.skip("needs a GPU and the CUDA build")
        return torch.device("cuda")
    if backend == "triton":
        dev = torch.device("cuda" if torch.cuda.is_available() and not mt.interpreting() else "cpu")
        if not mt.usable_on(dev):
            pytest.skip("Triton cannot run here (needs CUDA or TRITON_INTERPRET=1)")
        return dev
    if not _ext.HAS_EXT:
        pytest.skip("extension not built")
    return torch.device("cpu")


@pytest.mark.parametrize("pml_miner", [False, True], ids=["ours", "pml"])
@pytest.mark.parametrize("kind", sorted(MINERS))
@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_fused_miner_keeps_pml_counts(backend, kind, pml_miner, monkeypatch):
    dev = _device(backend)
    loss_name, ours, theirs = MINERS[kind]
    key = (backend, loss_name)
    if key not in fused.MINER_IMPLS:
        pytest.skip(f"no fused miner op for {key}")
    calls = []
    supports, impl = fused.MINER_IMPLS[key]
    monkeypatch.setitem(fused.MINER_IMPLS, key, (supports, lambda *a: calls.append(1) or impl(*a)))
    miner = theirs() if pml_miner else ours()
    loss = getattr(mo.losses, loss_name)(backend=backend, miner=miner)
    for seed, (b, d, classes) in enumerate([(23, 7, 4), (9, 3, 2), (31, 16, 9)]):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(b, d, generator=g).to(dev)
        y = torch.randint(0, classes, (b,), generator=g).to(dev)
        loss(x, y)
        oracle = theirs()
        oracle(x.cpu(), y.cpu())
        want = [getattr(oracle, n, 0) for n in NAMES]
        assert [getattr(miner, n) for n in NAMES] == want, (seed, want)
        assert all(type(getattr(miner, n)) is int for n in NAMES)
    assert len(calls) == 3, "the fused miner op was not used"


def test_counts_stay_tensors_until_read():
    if not _ext.HAS_EXT:
        pytest.skip("extension not built")
    miner = mo.miners.MultiSimilarityMiner(0.1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 4, generator=g), torch.randint(0, 3, (12,), generator=g)
    mo.losses.MultiSimilarityLoss(backend="cpu", miner=miner)(x, y)
    # no host sync in the loss call: the counts are converted when read
    assert any(isinstance(c, torch.Tensor) for c in miner._counts)
    pos = miner.num_pos_pairs
    assert isinstance(pos, int) and pos == len(pm.MultiSimilarityMiner(0.1)(x, y)[0])
