"""Host syncs per forward + backward: the reads of tensor data the library's glue makes
(tests/host_reads.py counts them on the CPU; on CUDA tensors each one drains the GPU queue).
Upper bounds per loss, so that a read added to a hot path fails here rather than showing up
as idle GPU time in a benchmark. The one read every loss makes is the NaN/Inf check of the
embeddings, before any launch."""
from __future__ import annotations

import pytest
import torch

import metrix_ops as mo
from host_reads import SyncCounter, reads_per_step
from launch_counter import LaunchCounter, launches_per_step

L = mo.losses
NAN_CHECK = "metrix_ops/validation.py"


def _clean(backend):
    return {
        "ms": (lambda: L.MultiSimilarityLoss(backend=backend), 1),
        "contrastive": (lambda: L.ContrastiveLoss(backend=backend), 1),
        "contrastive_sq_l2": (lambda: L.ContrastiveLoss(
            distance=mo.distances.LpDistance(power=2), backend=backend), 1),
        "circle": (lambda: L.CircleLoss(backend=backend), 1),
        "ntxent": (lambda: L.NTXentLoss(backend=backend), 1),
        "supcon": (lambda: L.SupConLoss(backend=backend), 1),
        "lifted": (lambda: L.LiftedStructureLoss(backend=backend), 1),
        "generalized_lifted": (lambda: L.GeneralizedLiftedStructureLoss(backend=backend), 1),
        "triplet": (lambda: L.TripletMarginLoss(backend=backend), 1),
        "hphn": (lambda: L.HPHNTripletLoss(backend=backend), 1),
        # the pairs' count sizes the op (one nonzero)
        "npairs": (lambda: L.NPairsLoss(backend=backend), 2),
        # the labels' range against the proxies is read with the NaN check
        "proxy_anchor": (lambda: L.ProxyAnchorLoss(5, 9, backend=backend), 1),
        "proxy_nca": (lambda: L.ProxyNCALoss(5, 9, backend=backend), 1),
        "ms_metrix": (lambda: L.MultiSimilarityLoss(metrix=mo.Metrix(), backend=backend), 1),
        "proxy_anchor_metrix": (lambda: L.ProxyAnchorLoss(5, 9, metrix=mo.Metrix(),
                                                          backend=backend), 1),
        # Embedding Expansion's segments are every positive pair: their count sizes them
        "ms_ee": (lambda: L.MultiSimilarityLoss(expansion=mo.Expansion(n_points=3),
                                                backend=backend), 2),
        "hphn_ee": (lambda: L.HPHNTripletLoss(expansion=mo.Expansion(n_points=2),
                                              backend=backend), 2),
        "lifted_ee": (lambda: L.LiftedStructureLoss(expansion=mo.Expansion(n_points=2),
                                                    backend=backend), 2),
        "generalized_lifted_ee": (lambda: L.GeneralizedLiftedStructureLoss(
            expansion=mo.Expansion(n_points=2), backend=backend), 2),
        "triplet_ee": (lambda: L.TripletMarginLoss(expansion=mo.Expansion(n_points=2),
                                                   backend=backend), 2),
        "ms_miner": (lambda: L.MultiSimilarityLoss(miner=mo.miners.MultiSimilarityMiner(),
                                                   backend=backend), 1),
        "triplet_semihard": (lambda: L.TripletMarginLoss(
            miner=mo.miners.TripletMarginMiner(type_of_triplets="semihard"),
            backend=backend), 1),
    }


CPU_CASES = _clean("cpu")


def _batch(b=23, d=9, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g), torch.randint(0, classes, (b,), generator=g)


@pytest.mark.parametrize("name", sorted(CPU_CASES))
def test_cpu_engine_reads(name):
    make, bound = CPU_CASES[name]
    x, y = _batch()
    counter = reads_per_step(make(), x, y)
    assert NAN_CHECK in " ".join(counter.sites), "the NaN check no longer reads?"
    assert counter.total <= bound, dict(counter.sites)


@pytest.mark.parametrize("name", ["ms", "contrastive", "circle", "lifted", "hphn", "proxy_anchor"])
def test_degenerate_batches_read_no_more(name):
    """Few or no pairs (one row; all rows of one class; one pair of one class): PML's zero loss
    is a select after the op, not a branch before it, so the reads stay the same."""
    make, bound = CPU_CASES[name]
    x, _ = _batch(b=6)
    for y in (torch.zeros(6, dtype=torch.long), torch.arange(6) % 5, torch.zeros(1, dtype=torch.long)):
        xb = x[:len(y)]
        loss_fn = make()
        ref = L.__dict__[type(loss_fn).__name__](
            **({"num_classes": 5, "embedding_size": 9} if "proxy" in name else {}),
            backend="reference")
        if "proxy" in name:
            ref.proxies.data.copy_(loss_fn.proxies.data)
        counter = reads_per_step(loss_fn, xb, y)
        assert counter.total <= bound, dict(counter.sites)
        a, b = xb.clone().requires_grad_(), xb.clone().requires_grad_()
        la, lb = loss_fn(a, y), ref(b, y)
        la.backward(), lb.backward()
        torch.testing.assert_close(la, lb)
        torch.testing.assert_close(a.grad, b.grad)


def test_counter_sees_a_read():
    """The counter itself: a read the glue makes is charged to it, the caller's are not."""
    x = torch.randn(4, 3)
    with SyncCounter() as c:
        float(x.sum())  # the test's own read
        x.tolist()
    assert c.total == 0
    with SyncCounter() as c:
        mo.losses.MultiSimilarityLoss(backend="cpu")(x, torch.tensor([0, 0, 1, 1]))
    assert c.total == 1 and NAN_CHECK in " ".join(c.sites)


def test_one_read_for_every_data_check():
    """The NaN checks of embeddings and ref_emb, the zero-row flag, the labels' range against
    the proxies and an indices_tuple's ranges: one host read in all, and each still raises
    its own error."""
    x, y = _batch()
    r, ry = _batch(b=7, seed=1)
    it = mo.miners.MultiSimilarityMiner()(x, y, r, ry)
    with SyncCounter() as c:
        L.ContrastiveLoss(backend="cpu")(x, y, it, ref_emb=r, ref_labels=ry)
    assert c.total == 1, dict(c.sites)
    bad = (it[0], it[1].clone(), it[2], it[3])
    bad[1][0] = 7
    with pytest.raises(ValueError, match=r"indices_tuple\[1\] holds indices outside \[0, 7\), "
                                          r"got values in \[\d+, 7\]"):
        L.ContrastiveLoss(backend="cpu")(x, y, bad, ref_emb=r, ref_labels=ry)
    r2 = r.clone()
    r2[3, 1] = float("nan")
    with pytest.raises(ValueError, match="ref_emb contains NaN"):
        L.ContrastiveLoss(backend="cpu")(x, y, it, ref_emb=r2, ref_labels=ry)
    with pytest.raises(ValueError, match=r"labels must be in \[0, num_classes=3\), got values "
                                         r"in \[0, 3\]"):
        L.ProxyNCALoss(3, 9, backend="cpu")(x, y)


# Launches per forward + backward on the CPU engine (tests/launch_counter.py): the glue's
# small kernels, which on a GPU cost a few microseconds each whatever the batch. Measured
# 2026-12-04 after the checks became one reduction each and the no-pairs rules products; a
# change that adds launches to these paths fails here (raise a bound only for a reason:
# NPairs' one more copies the labels its num_pairs statistic is counted from).
LAUNCHES = {"ms": 40, "contrastive": 62, "circle": 57, "ntxent": 52, "supcon": 60,
            "lifted": 57, "generalized_lifted": 42, "triplet": 36, "hphn": 74, "npairs": 41,
            "proxy_anchor": 57, "proxy_nca": 46, "ms_metrix": 70, "ms_miner": 36}


@pytest.mark.parametrize("name", sorted(LAUNCHES))
def test_cpu_engine_launches(name):
    make, _ = CPU_CASES[name]
    x, y = _batch()
    counter = launches_per_step(make(), x, y)
    assert counter.by_kind().get("compiled", 0) >= 2  # the op's forward and backward
    assert counter.total <= LAUNCHES[name], sorted(counter.sites.items())


def test_launch_counter_counts_kernels():
    """The counter itself: element-wise ops, reductions and copies count, views and
    allocations do not; a loss call's data checks are two launches (the NaN check's min/max,
    then the concatenation its one read takes); the caller's backward seed is charged to
    autograd, not to the library."""
    x = torch.randn(5, 4)
    with LaunchCounter() as c:
        y = (x * 2)[1:].t().reshape(-1)  # mul, then the copy reshape makes of a transpose
        torch.empty(3)
        y.sum()
    assert c.total == 3 and c.by_kind() == {"aten": 3}, dict(c.sites)
    from metrix_ops.validation import check_embeddings
    with LaunchCounter() as c:
        check_embeddings(x)
    assert sorted(k.rsplit(" ", 1)[1] for k in c.sites) == ["aminmax", "cat"], dict(c.sites)


def test_launch_counter_leaves_triton_as_it_was():
    """Entered again for each Python custom op's body, the counter still restores the Triton
    interpreter's launcher when the outermost use ends (and counts nothing after it)."""
    import metrix_ops.triton as mt
    if not mt.usable_on(torch.device("cpu")):
        pytest.skip("needs TRITON_INTERPRET=1")
    import triton.runtime.interpreter as interp
    before = interp.GridExecutor.__call__
    x, y = _batch()
    counter = launches_per_step(L.ContrastiveLoss(backend="triton"), x, y)
    assert counter.by_kind().get("triton", 0) >= 2
    assert interp.GridExecutor.__call__ is before
    total = counter.total
    L.ContrastiveLoss(backend="triton")(x.clone().requires_grad_(), y).backward()
    assert counter.total == total


# Launches per forward + backward on the Triton engine, counted as a GPU run queues them (the
# row normalisation as its one kernel each way; the Triton kernels run under the
# interpreter). Measured 2026-12-06 at B = 64 (benchmarks/host_syncs.py's batch), after
# HPHN's chosen distances and closest side pairs became Triton kernels (triton/pick_sims.py,
# triton/ee_side_pairs.py: 297 launches before on a GPU, where the PyTorch forms ran), EE's
# synthetic points' norms one kernel each way (triton/segment_norms.py; MS + EE 265 before)
# and TripletMargin's backward took its forward's positive layout (103 before).
TRITON_LAUNCHES = {
    "ms_ee": (lambda: L.MultiSimilarityLoss(backend="triton",
                                            expansion=mo.Expansion(n_points=4)), 201),
    "hphn_ee": (lambda: L.HPHNTripletLoss(backend="triton", expansion=mo.Expansion(n_points=4)),
                152),
    "triplet": (lambda: L.TripletMarginLoss(backend="triton"), 81)}


@pytest.mark.parametrize("name", sorted(TRITON_LAUNCHES))
def test_triton_engine_launches(name, monkeypatch):
    import metrix_ops.triton as mt
    if not mt.usable_on(torch.device("cpu")):
        pytest.skip("needs TRITON_INTERPRET=1")
    from metrix_ops.ops import unit_rows
    monkeypatch.setattr(unit_rows, "one_kernel", lambda t: t.dim() == 2)
    make, bound = TRITON_LAUNCHES[name]
    g = torch.Generator().manual_seed(0)
    # B = 24: MS + EE's count is 201 at 24, 32 and 64 alike (it follows the kernels, not the
    # batch), and the interpreter's cost of MS + EE grows about as B³ (226 s at 64)
    x, y = torch.randn(24, 32, generator=g), torch.randint(0, 8, (24,), generator=g)
    counter = launches_per_step(make(), x, y)
    assert counter.by_kind().get("compiled", 0) == 0, sorted(counter.sites.items())
    assert counter.total <= bound, sorted(counter.sites.items())
