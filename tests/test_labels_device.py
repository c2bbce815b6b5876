"""Labels, an indices_tuple and a proxy loss's proxies on another device than the embeddings
follow the embeddings' device, as PML moves them (CPU labels with CUDA embeddings: PML's
c_f.to_device; its proxy losses' cast_types); tensors without data (meta) are left for the
checks to name (test_bad_input.py). The moves themselves need a GPU."""
import pytest
import torch

import metrix_ops as mo
from metrix_ops.validation import pml_indices, pml_labels

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_only_real_tensors_on_another_device_move():
    y, x = torch.tensor([0, 1]), torch.zeros(2, 3)
    assert pml_labels(y, x) is y                  # same device, integer: the same tensor
    meta = torch.empty(2, dtype=torch.long, device="meta")
    assert pml_labels(meta, x) is meta            # no data: left for the check
    assert pml_labels(None, x) is None
    tup = (y, y, y)
    assert all(a is b for a, b in zip(pml_indices(tup, x), tup))
    assert pml_indices(None, x) is None


def test_meta_proxies_are_named():
    pa = mo.losses.ProxyAnchorLoss(3, 4).to("meta")
    with pytest.raises(ValueError, match="proxies are on meta"):
        pa(torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))


@needs_cuda
@pytest.mark.parametrize("make", [
    lambda: mo.losses.MultiSimilarityLoss(),
    lambda: mo.losses.ContrastiveLoss(backend="reference"),
    lambda: mo.losses.MultiSimilarityLoss(metrix=mo.Metrix(lam=0.3)),
    lambda: mo.losses.TripletMarginLoss(miner=mo.miners.BatchHardMiner()),
], ids=["ms", "contrastive-reference", "ms-metrix", "triplet-miner"])
def test_cpu_labels_with_cuda_embeddings_as_pml(make):
    x = torch.randn(24, 16, device="cuda")
    y = torch.randint(0, 5, (24,))
    loss = make()
    torch.testing.assert_close(loss(x, y), loss(x, y.cuda()))
    r, ry = torch.randn(9, 16, device="cuda"), torch.randint(0, 5, (9,))
    if not loss.metrix and not loss.miner:
        torch.testing.assert_close(loss(x, y, ref_emb=r, ref_labels=ry),
                                   loss(x, y.cuda(), ref_emb=r, ref_labels=ry.cuda()))


@needs_cuda
def test_cpu_labels_in_miners_and_the_bank_and_cpu_indices():
    x = torch.randn(20, 8, device="cuda")
    y = torch.randint(0, 4, (20,))
    miner = mo.miners.MultiSimilarityMiner()
    tup = miner(x, y)
    for a, b in zip(tup, miner(x, y.cuda())):
        assert torch.equal(a, b)
    loss = mo.losses.ContrastiveLoss()
    torch.testing.assert_close(loss(x, y, tuple(t.cpu() for t in tup)), loss(x, y.cuda(), tup))
    xbm = mo.losses.CrossBatchMemory(mo.losses.ContrastiveLoss(), 8, memory_size=40).cuda()
    xbm2 = mo.losses.CrossBatchMemory(mo.losses.ContrastiveLoss(), 8, memory_size=40).cuda()
    torch.testing.assert_close(xbm(x, y), xbm2(x, y.cuda()))
    assert xbm.label_memory.device.type == "cuda"


@needs_cuda
def test_proxies_follow_the_embeddings_device_as_pml():
    torch.manual_seed(0)
    pa = mo.losses.ProxyAnchorLoss(4, 8)          # never .cuda()-ed
    on_gpu = mo.losses.ProxyAnchorLoss(4, 8)
    on_gpu.proxies.data.copy_(pa.proxies.data)
    on_gpu = on_gpu.cuda()
    param = pa.proxies
    x, y = torch.randn(12, 8, device="cuda"), torch.randint(0, 4, (12,), device="cuda")
    torch.testing.assert_close(pa(x, y), on_gpu(x, y))
    assert pa.proxies is param and pa.proxies.device.type == "cuda"
