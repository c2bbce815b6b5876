"""metrix_ops.utils.distributed against PML's wrappers in a real two-process group (gloo, on
the CPU): DistributedLossWrapper with efficient False and True over fused and reference
losses (values and each rank's gradient equal PML's wrapper around the PML loss), ranks of
unequal batch sizes and Metrix (against the whole gathered batch computed in one process on
the reference backend), λ drawn once for all ranks, a wrapped CrossBatchMemory over calls
that fill its bank, DistributedMinerWrapper's tuples; and the wrappers' argument checks and
their single-process behaviour. The ranks' work is tests/distributed_cases.py."""
import os
import tempfile

import pytest
import torch

import metrix_ops as mo
from metrix_ops.utils.distributed import (DistributedLossWrapper, DistributedMinerWrapper,
                                          is_distributed)

import distributed_cases as dc

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed is not available")


@pytest.fixture(scope="module")
def ranks():
    """Each rank's saved results, from one spawn of WORLD processes."""
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(dc.rank_main, args=(os.path.join(d, "store"), d), nprocs=dc.WORLD)
        return [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=False)
                for r in range(dc.WORLD)]


CASES = ([c[0] for c in dc.loss_cases()] + ["xbm-0", "xbm-1", "xbm-mask-0", "xbm-mask-1",
                                            "one-row", "mined-False", "mined-True"]
         + [f"ref-{n}-{e}" for n in ("MultiSimilarityLoss", "ContrastiveLoss")
            for e in (False, True)])


@pytest.mark.parametrize("key", CASES)
def test_loss_wrapper_equals_oracle(ranks, key):
    for out in ranks:
        (v, g), (vo, go) = out[key], out[key + "/oracle"]
        torch.testing.assert_close(v, vo.to(v.dtype), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(g, go, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("key", [c[0] for c in dc.loss_cases() if not c[3]])
def test_every_rank_computes_the_whole_batch_loss(ranks, key):
    """efficient=False: every rank's value is the same (the whole gathered batch's)."""
    torch.testing.assert_close(ranks[0][key][0], ranks[1][key][0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("key", ["drawn-lam", "drawn-lam-xbm"])
def test_metrix_lam_is_drawn_once_for_all_ranks(ranks, key):
    """The ranks' generators are seeded differently (their own draws of λ differ), yet their
    whole-batch losses agree: λ came from rank 0 (also for a wrapped CrossBatchMemory)."""
    torch.testing.assert_close(ranks[0][key][0], ranks[1][key][0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("efficient", [False, True])
@pytest.mark.parametrize("kind", ["ms", "triplet"])
def test_miner_wrapper_equals_pml(ranks, kind, efficient):
    for out in ranks:
        ours, pml = out[f"miner-{kind}-{efficient}"], out[f"miner-{kind}-{efficient}/oracle"]
        assert len(ours) == len(pml)
        # as sets: (a, p) and (a, n) pairs, or (a, p, n) triplets
        groups = ((0, 1), (2, 3)) if len(ours) == 4 else ((0, 1, 2),)
        for g in groups:
            def rows(t):
                return sorted(zip(*(t[i].tolist() for i in g)))
            assert rows(ours) == rows(pml) and len(rows(ours)) > 0


def test_outside_a_process_group_the_loss_runs_as_is():
    assert not is_distributed()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(9, 4, generator=g), torch.randint(0, 3, (9,), generator=g)
    loss = mo.losses.MultiSimilarityLoss(metrix=mo.Metrix(lam=0.4))
    with pytest.warns(UserWarning, match="non-distributed"):
        v = DistributedLossWrapper(loss, efficient=True)(x, y)
    torch.testing.assert_close(v, loss(x, y))
    miner = mo.miners.MultiSimilarityMiner(0.1)
    for a, b in zip(DistributedMinerWrapper(miner)(x, y), miner(x, y)):
        assert torch.equal(a, b)


def test_bad_arguments_are_named():
    ms = mo.losses.MultiSimilarityLoss()
    with pytest.raises(TypeError, match="metrix_ops loss or CrossBatchMemory"):
        import pytorch_metric_learning.losses as pl
        DistributedLossWrapper(pl.MultiSimilarityLoss())
    with pytest.raises(ValueError, match="CrossBatchMemory with efficient=True"):
        DistributedLossWrapper(mo.losses.CrossBatchMemory(ms, 4), efficient=True)
    with pytest.raises(ValueError, match="expansion="):
        DistributedLossWrapper(mo.losses.MultiSimilarityLoss(
            expansion=mo.Expansion(n_points=2)), efficient=True)
    with pytest.raises(ValueError, match="HPHNTripletLoss does not take; use efficient=False"):
        DistributedLossWrapper(mo.losses.HPHNTripletLoss(), efficient=True)
    with pytest.raises(ValueError, match="embedding level; got level='feature'"):
        DistributedLossWrapper(mo.losses.MultiSimilarityLoss(metrix=mo.Metrix(level="feature")))
    xbm = DistributedLossWrapper(mo.losses.CrossBatchMemory(ms, 4))
    with pytest.raises(ValueError, match="not compatible with ref_emb"):  # as PML, any world
        xbm(torch.randn(3, 4), torch.zeros(3), ref_emb=torch.randn(3, 4))
    with pytest.raises(ValueError, match="DistributedMinerWrapper"):
        DistributedLossWrapper(mo.losses.MultiSimilarityLoss(
            miner=mo.miners.MultiSimilarityMiner()), efficient=True)
    with pytest.raises(ValueError, match="efficient=True.*embedding level"):
        DistributedLossWrapper(mo.losses.MultiSimilarityLoss(
            metrix=mo.Metrix(pairs="neg_neg")), efficient=True)
    with pytest.raises(TypeError, match="miner must be"):
        DistributedMinerWrapper(3)
