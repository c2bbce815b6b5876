"""CrossBatchMemory against PML's over sequences of calls: filling, wrapping around,
enqueue_mask, a miner, a given indices_tuple; the bank's state; bad arguments."""
import pytest
import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners

import metrix_ops as mo
from metrix_ops.reference.metrix import metrix_loss

LOSSES = ["MultiSimilarityLoss", "ContrastiveLoss", "TripletMarginLoss", "NTXentLoss",
          "CircleLoss", "LiftedStructureLoss", "SupConLoss", "GeneralizedLiftedStructureLoss"]


def _pair(name, memory_size, dim, miner=None, pml_miner=None, backend="reference"):
    ours = mo.losses.CrossBatchMemory(getattr(mo.losses, name)(backend=backend), dim,
                                      memory_size=memory_size, miner=miner)
    theirs = pml_losses.CrossBatchMemory(getattr(pml_losses, name)(), dim,
                                         memory_size=memory_size, miner=pml_miner)
    return ours, theirs


def _step(module, x, y, **kw):
    x = x.detach().clone().requires_grad_(True)
    out = module(x, y, **kw)
    g = torch.autograd.grad(out, x, allow_unused=True)[0] if out.requires_grad else None
    return out.detach(), torch.zeros_like(x) if g is None else g


def _batches(sizes, dim, classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, dim, generator=g, dtype=torch.float64),
             torch.randint(0, classes, (b,), generator=g)) for b in sizes]


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("memory_size,sizes", [(23, [7, 9, 8, 11, 5]), (16, [16, 16, 3])])
def test_sequence_equals_pml(name, memory_size, sizes):
    ours, theirs = _pair(name, memory_size, 5)
    theirs = theirs.double()
    for x, y in _batches(sizes, 5, 4):
        (va, ga), (vb, gb) = _step(ours, x, y), _step(theirs, x, y)
        torch.testing.assert_close(va, vb.to(va.dtype), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-9)
        assert ours.queue_idx == theirs.queue_idx
        assert ours.has_been_filled == theirs.has_been_filled
        assert torch.equal(ours.label_memory, theirs.label_memory)
        torch.testing.assert_close(ours.embedding_memory, theirs.embedding_memory.to(torch.float64))


@pytest.mark.parametrize("name", ["MultiSimilarityLoss", "ContrastiveLoss", "TripletMarginLoss"])
def test_enqueue_mask_miner_and_indices_tuple_equal_pml(name):
    torch.manual_seed(0)
    for kind in ("mask", "miner", "tuple"):
        miner = mo.miners.MultiSimilarityMiner() if kind == "miner" else None
        pml_miner = pml_miners.MultiSimilarityMiner() if kind == "miner" else None
        ours, theirs = _pair(name, 20, 6, miner, pml_miner)
        theirs = theirs.double()
        for i, (x, y) in enumerate(_batches([9, 12, 10, 9], 6, 3, seed=1)):
            kw = {}
            if kind == "mask":
                kw["enqueue_mask"] = torch.arange(len(x)) % 3 == i % 3
            elif kind == "tuple" and i % 2:
                kw["indices_tuple"] = _valid_triplets(y, ours.queue_idx, 20)
            (va, ga), (vb, gb) = _step(ours, x, y, **kw), _step(theirs, x, y, **kw)
            torch.testing.assert_close(va, vb.to(va.dtype), rtol=1e-6, atol=1e-9,
                                       msg=lambda m: f"{kind} step {i}: {m}")
            torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ["MultiSimilarityLoss", "ContrastiveLoss", "TripletMarginLoss"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-4)])
def test_fused_bank_equals_pml_without_listing_pairs(name, dtype, tol, monkeypatch):
    """backend='cpu': the bank goes through the streaming op (listing pairs would raise here),
    over fills and wrap-arounds, and equals PML."""
    import metrix_ops.losses.cross_batch_memory as cbm_mod

    def no_pairs(*a, **k):
        raise AssertionError("the fused path must not list pairs")

    monkeypatch.setattr(cbm_mod, "all_pairs", no_pairs)
    ours, theirs = _pair(name, 37, 6, backend="cpu")
    theirs = theirs.to(dtype)
    for x, y in _batches([13, 17, 11, 15, 1], 6, 5, seed=3):
        x = x.to(dtype)
        (va, ga), (vb, gb) = _step(ours, x, y), _step(theirs, x, y)
        if len(x) == 1:  # PML keeps the self pair of a one-row batch; compare to the listing
            continue
        torch.testing.assert_close(va, vb.to(va.dtype), rtol=tol, atol=tol * 1e-3)
        torch.testing.assert_close(ga, gb, rtol=tol, atol=tol * 1e-3)


def test_large_bank_fused_equals_listed_pairs():
    """A bank of 6000 (filled, wrapped): the fused path against the pairs path of the same
    wrapped loss on the reference backend."""
    torch.manual_seed(0)
    fused = mo.losses.CrossBatchMemory(mo.losses.MultiSimilarityLoss(backend="cpu"), 16, 6000)
    listed = mo.losses.CrossBatchMemory(mo.losses.MultiSimilarityLoss(backend="reference"), 16, 6000)
    for step in range(30):
        x, y = torch.randn(256, 16, dtype=torch.float64), torch.randint(0, 50, (256,))
        (va, ga), (vb, gb) = _step(fused, x, y), _step(listed, x, y)
        if step in (0, 23, 29):  # empty-ish, just wrapped, wrapped again
            torch.testing.assert_close(va, vb, rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-9)
    assert fused.has_been_filled and fused.queue_idx == (30 * 256) % 6000


def _valid_triplets(y, start, memory_size):
    """Triplets of the batch's rows, indexed by the bank slots the batch is about to take."""
    slot = lambda j: (start + j) % memory_size  # noqa: E731
    a, p, n = [], [], []
    for i in range(len(y)):
        same = [j for j in range(len(y)) if j != i and y[j] == y[i]]
        other = [j for j in range(len(y)) if y[j] != y[i]]
        if same and other:
            a.append(i), p.append(slot(same[0])), n.append(slot(other[-1]))
    return torch.tensor(a), torch.tensor(p), torch.tensor(n)


def test_an_anchor_is_never_its_own_positive():
    """A batch of one against an empty bank has no pair (PML keeps the self pair when the
    batch has one row — its slot range has start == end — so it is not the oracle here)."""
    cbm = mo.losses.CrossBatchMemory(mo.losses.ContrastiveLoss(pos_margin=0.5), 3, memory_size=4)
    x = torch.randn(1, 3, requires_grad=True)
    assert float(cbm(x, torch.tensor([0])).detach()) == 0.0
    # the same vector enqueued twice: the second call pairs the copy in the bank, not itself
    out = cbm(torch.cat([x, x]).detach(), torch.tensor([0, 0]))
    assert float(out) == 0.0  # positive pairs at distance 0 cost nothing with pos_margin 0.5


@pytest.mark.parametrize("kwargs,msg", [
    (dict(embedding_size=0), "embedding_size"),
    (dict(memory_size=-1), "memory_size"),
])
def test_bad_construction(kwargs, msg):
    args = dict(embedding_size=4, memory_size=8) | kwargs
    with pytest.raises(ValueError, match=msg):
        mo.losses.CrossBatchMemory(mo.losses.ContrastiveLoss(), **args)


def test_bad_calls():
    with pytest.raises(ValueError, match="CrossBatchMemory wraps"):
        mo.losses.CrossBatchMemory(mo.losses.ProxyAnchorLoss(num_classes=3, embedding_size=4), 4)
    cbm = mo.losses.CrossBatchMemory(mo.losses.ContrastiveLoss(), 4, memory_size=8)
    y = torch.zeros(9, dtype=torch.long)
    with pytest.raises(ValueError, match="does not fit memory_size=8"):
        cbm(torch.randn(9, 4), y)
    with pytest.raises(ValueError, match="embedding_size=4"):
        cbm(torch.randn(3, 5), y[:3])
    with pytest.raises(ValueError, match="enqueue_mask must be a bool"):
        cbm(torch.randn(3, 4), y[:3], enqueue_mask=torch.ones(3))
    with pytest.raises(ValueError, match="mutually exclusive"):
        cbm(torch.randn(3, 4), y[:3], indices_tuple=(y[:1], y[:1], y[:1]),
            enqueue_mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="labels"):
        cbm(torch.randn(3, 4), torch.zeros(2, dtype=torch.long))


METRIX_LOSSES = ["MultiSimilarityLoss", "ContrastiveLoss", "CircleLoss",
                 "GeneralizedLiftedStructureLoss"]


def _expected_with_metrix(clean_cbm, name, x, y, lam, pairs, weight, enqueue_mask=None):
    """The clean loss of a reference-backend CrossBatchMemory (PML-tested above) plus
    weight × the reference's Metrix term (reference/metrix.py: the B × M × M candidates) of
    the batch against the bank it holds after the call, each anchor's own slot excluded
    (rolled to column i, the reference's same-set rule)."""
    start = clean_cbm.queue_idx
    clean = clean_cbm(x, y, enqueue_mask=enqueue_mask)
    bank, bank_y = clean_cbm._bank()
    if enqueue_mask is None:
        bank, bank_y, xs, ys = (torch.roll(bank, -start, 0), torch.roll(bank_y, -start, 0),
                                x, y)
    else:
        xs, ys = x[~enqueue_mask], y[~enqueue_mask]
    loss = getattr(mo.losses, name)()
    spec = mo.spec.get_spec(name)
    inp = mo.spec.LossInputs(xs, ys, None, bank, bank_y, enqueue_mask is None,
                             mo.distances.as_distance(loss.distance, spec.default_distance))
    mixed = metrix_loss(name, loss.loss_params(), inp,
                        mo.Metrix(level="embedding", pairs=pairs), lam)
    return clean + weight * mixed


@pytest.mark.parametrize("pairs", ["pos_neg", "anchor_neg", "pos_pos"])
@pytest.mark.parametrize("name", METRIX_LOSSES)
def test_embedding_metrix_against_the_bank(name, pairs):
    """Embedding-level Metrix through the bank (PML has no Metrix): over calls that fill and
    wrap it, and a call with enqueue_mask, values and gradients against the clean reference
    module plus the reference's Metrix term; the CPU ops and the reference backend alike."""
    mx = mo.Metrix(level="embedding", pairs=pairs, weight=0.6)
    mods = {b: mo.losses.CrossBatchMemory(getattr(mo.losses, name)(backend=b, metrix=mx), 5,
                                          memory_size=23)
            for b in ("auto", "reference")}
    clean = mo.losses.CrossBatchMemory(getattr(mo.losses, name)(backend="reference"), 5,
                                       memory_size=23)
    for k, (x, y) in enumerate(_batches([7, 9, 8, 11, 5], 5, 4, seed=31)):
        lam = 0.2 + 0.1 * k
        mask = torch.arange(len(y)) % 3 == 0 if k == 3 else None
        x = x.requires_grad_(True)
        want = _expected_with_metrix(clean, name, x, y, lam, pairs, 0.6, mask)
        (g_want,) = torch.autograd.grad(want, x)
        for mod in mods.values():
            got = mod(x, y, enqueue_mask=mask, lam=lam)
            (g_got,) = torch.autograd.grad(got, x)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(g_got, g_want, rtol=1e-6, atol=1e-9)


def test_metrix_the_bank_cannot_take():
    for loss, msg in [(mo.losses.MultiSimilarityLoss(metrix=mo.Metrix(pairs="neg_neg")), "pairs"),
                      (mo.losses.ContrastiveLoss(metrix=mo.Metrix(
                          level="feature")), "embedding level"),
                      (mo.losses.TripletMarginLoss(metrix=mo.Metrix()), "TripletMarginLoss"),
                      (mo.losses.ContrastiveLoss(metrix=mo.Metrix(),
                                                 distance=mo.distances.LpDistance(
                                                     normalize_embeddings=False)), "normalising"),
                      (mo.losses.MultiSimilarityLoss(expansion=mo.Expansion()), "expansion")]:
        with pytest.raises(ValueError, match=msg):
            mo.losses.CrossBatchMemory(loss, 4, memory_size=8)
