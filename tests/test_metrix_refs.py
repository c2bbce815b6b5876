"""Embedding-level Metrix in checkpointed anchor chunks (fused/metrix_refs.py), the mixed term
of the calls no fused Metrix op takes (ref_emb, an indices_tuple beside Metrix, ...): the loss
against the reference, which builds the B × M × M candidate tensor, over the shared edge cases
with reference sets that share only some classes with the batch; chunking down to one anchor
per chunk; the batch against itself (self pairs excluded); distances, hyper-parameters, fp32
and bf16; and the fallback where one anchor's row would be too long."""
import pytest
import torch

import metrix_ops as mo
from cases import CASE_IDS, CASES, assert_close_vg, assert_float32_and_bf16, make_case
from metrix_ops import _ext
from metrix_ops import fused
from metrix_ops.fused import metrix_refs as mr
from metrix_ops.fused import multi_similarity as fused_ms
from metrix_ops.reference.metrix import metrix_loss
from triton_cases import on_dev, requires_triton

pytestmark = pytest.mark.skipif(not _ext.HAS_EXT, reason="extension not built")

HYPER = {"MultiSimilarityLoss": {"alpha": 3.0, "beta": 40.0, "base": 0.3},
         "ContrastiveLoss": {"pos_margin": 0.1, "neg_margin": 0.7},
         "CircleLoss": {"m": 0.3, "gamma": 40.0},
         "GeneralizedLiftedStructureLoss": {"pos_margin": 0.2, "neg_margin": 0.9}}
LOSSES = tuple(HYPER)


@pytest.fixture(autouse=True)
def chunks_only(monkeypatch):
    """This file tests the PyTorch chunks: the CPU ops that take these losses' Metrix terms
    against references instead are tested in test_metrix_refs_op.py (off here: the fused
    Metrix entries keep to the batch against itself, and the chunks call no op)."""
    for name in LOSSES:
        supports, impl = fused.METRIX_IMPLS[("cpu", name)]
        monkeypatch.setitem(fused.METRIX_IMPLS, ("cpu", name),
                            (lambda *a, s=supports: s(*a) and fused_ms.self_pairs(a[1]), impl))
    monkeypatch.setattr(mr, "_fused_term", lambda *a: None)


def record_calls(monkeypatch, module, name, calls=None):
    """module.name wrapped to keep its results, each time it is called, in `calls` (a new
    list by default); the list."""
    calls = [] if calls is None else calls
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **kw: calls.append(real(*a, **kw)) or calls[-1])
    return calls


@pytest.fixture
def counted(monkeypatch):
    """The anchor-chunk term's results, each time the driver called it."""
    return record_calls(monkeypatch, mr, "mixed_term")


def pair(name, pairs, backend="cpu", lam=0.35, **kw):
    mx = mo.Metrix(level="embedding", pairs=pairs, lam=lam, weight=0.6)
    return [getattr(mo.losses, name)(backend=be, metrix=mx, **kw)
            for be in (backend, "reference")]


def refs_for(x, y, seed, extra=4):
    """A reference set of B + extra rows: some of the batch's classes, some classes of its
    own (labels up to max(y) + 3), so some anchors have no positive among them."""
    g = torch.Generator().manual_seed(seed)
    m = x.shape[0] + extra
    top = int(y.max()) + 3 if len(y) else 3
    r = torch.randn(m, x.shape[1], dtype=x.dtype, generator=g).requires_grad_()
    return r, torch.randint(0, top, (m,), generator=g)


def check_refs(name, pairs, x, y, r, ry, **kw):
    fused, ref = pair(name, pairs, **kw)
    assert_close_vg(lambda e, q: fused(e, y, ref_emb=q, ref_labels=ry),
                    lambda e, q: ref(e, y, ref_emb=q, ref_labels=ry), x, r)


@pytest.mark.parametrize("pairs", mr.PAIRS)
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_ref_emb_equals_reference(name, pairs, case, counted):
    x, y = make_case(case, seed=3)
    r, ry = refs_for(x, y, seed=4)
    check_refs(name, pairs, x, y, r, ry)
    assert counted and all(c is not None for c in counted)


@pytest.mark.parametrize("pairs", mr.PAIRS)
def test_one_anchor_per_chunk(pairs, monkeypatch, counted):
    monkeypatch.setattr(mr, "CHUNK_ENTRIES", 1)  # every chunk a single anchor
    x, y = make_case(CASES[1], seed=5)
    r, ry = refs_for(x, y, seed=6, extra=9)
    check_refs("MultiSimilarityLoss", pairs, x, y, r, ry)
    check_refs("ContrastiveLoss", pairs, x, y, r, ry)
    assert counted


def test_chunks_cover_every_anchor_once(monkeypatch):
    monkeypatch.setattr(mr, "CHUNK_ENTRIES", 100)  # several chunks
    width = torch.tensor([3, 0, 7, 1, 1, 7, 2, 0, 5])
    seen, ks = [], []
    for anchors, k in mr._chunks(width, lambda k: (k + 1) * 10):
        seen += anchors.tolist()
        ks.append(k)
        assert k == max(int(width[anchors].max()), 1)
        assert len(anchors) == 1 or len(anchors) * (k + 1) * 10 <= mr.CHUNK_ENTRIES
    assert sorted(seen) == list(range(len(width)))
    assert ks == sorted(ks) and len(ks) > 2  # by class size: a chunk pads to its classes


@pytest.mark.parametrize("pairs", mr.PAIRS)
@pytest.mark.parametrize("name", LOSSES)
def test_batch_against_itself_equals_reference(name, pairs, monkeypatch):
    """same_set: a is neither its own positive nor mixed with itself; small chunks."""
    monkeypatch.setattr(mr, "CHUNK_ENTRIES", 64)
    for case in (CASES[0], CASES[6], CASES[7]):
        x, y = make_case(case, seed=7)
        inp = mo.spec.LossInputs(x, y, None, x, y, True, mo.distances.CosineSimilarity()
                                 if name in ("MultiSimilarityLoss", "CircleLoss")
                                 else mo.distances.LpDistance())
        mx = mo.Metrix(level="embedding", pairs=pairs, lam=0.3)
        params = HYPER[name]
        assert_close_vg(lambda e: mr.mixed_term(name, params, inp.__class__(
                            e, y, None, e, y, True, inp.distance), mx, 0.3),
                        lambda e: metrix_loss(name, params, inp.__class__(
                            e, y, None, e, y, True, inp.distance), mx, 0.3), x)


@pytest.mark.parametrize("name", LOSSES)
def test_hyper_parameters_and_distances(name, counted):
    x, y = make_case(CASES[1], seed=8)
    r, ry = refs_for(x, y, seed=9)
    check_refs(name, "pos_neg", x, y, r, ry, **HYPER[name])
    if name in ("ContrastiveLoss", "GeneralizedLiftedStructureLoss"):  # L2 by default
        check_refs(name, "pos_neg", x, y, r, ry, distance=mo.distances.CosineSimilarity())
    assert counted


def test_metrix_beside_an_indices_tuple(counted):
    """the fused Metrix op takes no tuple: the clean loss on the tuple's pairs, the mixed
    term (over all pairs, no miner on mixed candidates) from the chunks"""
    x, y = make_case(CASES[1], seed=10)
    a, p, n = mo.miners.TripletMarginMiner(margin=0.3)(x.detach(), y)
    fused, ref = pair("MultiSimilarityLoss", "pos_neg")
    assert_close_vg(lambda e: fused(e, y, (a, p, n)), lambda e: ref(e, y, (a, p, n)), x)
    assert counted


def test_float32_and_half(counted):
    x, y = make_case(CASES[1], seed=11)
    r, ry = refs_for(x, y, seed=12)
    fused, ref = pair("MultiSimilarityLoss", "pos_neg")
    rd = r.detach()
    assert_float32_and_bf16(lambda e: fused(e, y, ref_emb=rd.to(e.dtype), ref_labels=ry),
                            lambda e: ref(e, y, ref_emb=rd.to(e.dtype), ref_labels=ry), x)
    h = x.detach().half()  # fp16 too: computed in fp32 as the driver does for half inputs
    torch.testing.assert_close(fused(h, y, ref_emb=rd.half(), ref_labels=ry),
                               ref(h.float(), y, ref_emb=rd.half().float(), ref_labels=ry),
                               rtol=1e-4, atol=1e-5)


def test_rows_longer_than_a_chunk_still_run(monkeypatch, counted):
    """An anchor whose row alone exceeds CHUNK_ENTRIES is a chunk of its own (the reference
    would hold every anchor's row at once)."""
    monkeypatch.setattr(mr, "CHUNK_ENTRIES", 10)  # below (K + 1)·M for every anchor
    x, y = make_case(CASES[0], seed=13)
    r, ry = refs_for(x, y, seed=14)
    check_refs("CircleLoss", "pos_neg", x, y, r, ry)
    assert counted and all(c is not None for c in counted)


def test_large_pos_pos_class_goes_to_the_chunks(monkeypatch, counted):
    """pos_pos of the batch against itself past the class blocks' cap: the chunks, not the
    reference's B × B × B tensor"""
    from metrix_ops.fused import metrix_pos_pos
    monkeypatch.setattr(metrix_pos_pos, "MAX_ENTRIES", 10)
    x, y = make_case(CASES[1], seed=20)
    fused, ref = pair("MultiSimilarityLoss", "pos_pos")
    assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x)
    assert counted


def test_clean_loss_on_the_reference_keeps_the_chunked_mixed_term(counted):
    """backend="auto" runs the clean loss on the reference where no op takes its distance
    (squared L2 here); the mixed term still comes from the chunks"""
    x, y = make_case(CASES[0], seed=21)
    r, ry = refs_for(x, y, seed=22)
    dist = mo.distances.LpDistance(power=2)
    fused, ref = pair("ContrastiveLoss", "pos_neg", backend="auto", distance=dist)
    assert_close_vg(lambda e, q: fused(e, y, ref_emb=q, ref_labels=ry),
                    lambda e, q: ref(e, y, ref_emb=q, ref_labels=ry), x, r)
    assert counted


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_neg_neg_in_chunks_equals_reference(name, case, counted, monkeypatch):
    """neg_neg (every ordered pair of distinct negatives, label 0) against references and
    the batch against itself, in chunks of one anchor (M² past CHUNK_ENTRIES) and of all:
    the reference's values and gradients"""
    x, y = make_case(case, seed=15)
    r, ry = refs_for(x, y, seed=16)
    for entries in (1, mr.CHUNK_ENTRIES):
        monkeypatch.setattr(mr, "CHUNK_ENTRIES", entries)
        check_refs(name, "neg_neg", x, y, r, ry, **HYPER[name])
        fused, ref = pair(name, "neg_neg", **HYPER[name])
        assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x)
    assert counted


def test_neg_neg_without_the_cubic_tensor():
    """B = 48 against M = 1500 references: the reference's candidate tensor would be
    48 · 1500² entries (0.9 GB in float64); the chunks hold one anchor's M² at a time (and
    the shared M × M norms). Against the reference anchor by anchor: MS's L̃ is the mean of
    ℓ̃(a) over the anchors with candidates, all 48 here."""
    g = torch.Generator().manual_seed(19)
    r = torch.randn(1500, 6, dtype=torch.float64, generator=g)
    ry = torch.randint(0, 40, (1500,), generator=g)
    x = torch.randn(48, 6, dtype=torch.float64, generator=g)
    y = torch.randint(0, 40, (48,), generator=g)
    mx = mo.Metrix(level="embedding", pairs="neg_neg", lam=0.3)
    params = HYPER["MultiSimilarityLoss"]

    def inputs(rows):
        return mo.spec.LossInputs(x[rows], y[rows], None, r, ry, False,
                                  mo.distances.CosineSimilarity())

    got = mr.mixed_term("MultiSimilarityLoss", params, inputs(slice(None)), mx, 0.3)
    want = sum(metrix_loss("MultiSimilarityLoss", params, inputs(slice(i, i + 1)), mx, 0.3)
               for i in range(48)) / 48
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def large_reference_case():
    """(x, y, r, ry, metrix, MS params): 64 anchors, 3000 references in classes of 6, some
    anchors without a class among them."""
    g = torch.Generator().manual_seed(17)
    r = torch.randn(3000, 8, dtype=torch.float64, generator=g)
    ry = torch.arange(3000) // 6
    x = torch.randn(64, 8, dtype=torch.float64, generator=g)
    y = torch.randint(0, 600, (64,), generator=g)
    mx = mo.Metrix(level="embedding", pairs="pos_neg", lam=0.4)
    return x, y, r, ry, mx, {"alpha": 2.0, "beta": 50.0, "base": 0.5}


def test_large_reference_set_without_cubic_memory():
    """B = 64 against M = 3000 references in classes of 6: the reference's candidate
    tensor would be 64 · 3000² entries (4.6 GB in float64); a chunk holds at most
    CHUNK_ENTRIES. Every eighth anchor against the mean of one-anchor references (B = 1:
    3000² entries each), MS being a mean over anchors with a non-empty V(a)."""
    x, y, r, ry, mx, params = large_reference_case()
    cos = mo.distances.CosineSimilarity()

    def inputs(rows):
        return mo.spec.LossInputs(x[rows], y[rows], None, r, ry, False, cos)

    got = mr.mixed_term("MultiSimilarityLoss", params, inputs(slice(None, None, 8)), mx, 0.4)
    per = [metrix_loss("MultiSimilarityLoss", params, inputs(slice(i, i + 1)), mx, 0.4)
           for i in range(0, 64, 8)]
    assert int((y[::8] >= 500).sum()) > 0 and int((y[::8] < 500).sum()) > 0
    torch.testing.assert_close(got, torch.stack(per).mean(), rtol=1e-9, atol=1e-12)


@requires_triton
def test_triton_engine(counted):
    x, y = make_case(CASES[0], seed=18)
    r, ry = refs_for(x, y, seed=19)
    x, y, r, ry = on_dev(x, y, r, ry)
    check_refs("MultiSimilarityLoss", "pos_neg", x, y, r, ry, backend="triton")
    assert counted
