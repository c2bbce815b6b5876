"""Embedding-level Metrix with pairs="pos_pos" from class blocks (fused/metrix_pos_pos.py), the
term every engine adds to its clean loss: the candidate rows against brute-force loops over
the DESIGN §1 formula, the losses against the reference (which builds the B × B × B candidate
tensor) over the shared edge cases, distances, hyper-parameters, dtypes and engines, and the
fallback where the class blocks would be too large."""
import pytest
import torch
import torch.nn.functional as F

import metrix_ops as mo
from cases import CASE_IDS, CASES, assert_close_vg, assert_float32_and_bf16, make_case
from metrix_ops import _ext
from metrix_ops.fused import metrix_pos_pos as mpp
from triton_cases import on_dev, requires_triton

pytestmark = pytest.mark.skipif(not _ext.HAS_EXT, reason="extension not built")

HYPER = {"MultiSimilarityLoss": {"alpha": 3.0, "beta": 40.0, "base": 0.3},
         "ContrastiveLoss": {"pos_margin": 0.1, "neg_margin": 0.7},
         "CircleLoss": {"m": 0.3, "gamma": 40.0},
         "GeneralizedLiftedStructureLoss": {"pos_margin": 0.2, "neg_margin": 0.9}}


@pytest.fixture
def counted(monkeypatch):
    """How often the class-block term ran (the driver looks it up at call time)."""
    calls = []
    real = mpp.mixed_term
    monkeypatch.setattr(mpp, "mixed_term", lambda *a: calls.append(1) or real(*a))
    return calls


def pair(name, backend="cpu", lam=0.35, **kw):
    mx = mo.Metrix(level="embedding", pairs="pos_pos", lam=lam, weight=0.6)
    return [getattr(mo.losses, name)(backend=be, metrix=mx, **kw)
            for be in (backend, "reference")]


def test_candidate_rows_equal_loops():
    g = torch.Generator().manual_seed(1)
    x = F.normalize(torch.randn(14, 5, dtype=torch.float64, generator=g), dim=1)
    y = torch.tensor([2, 0, 2, 1, 2, 0, 2, 1, 7, 0, 2, 1, 1, 9])
    lam = 0.3
    s, member = mpp.candidate_rows(x, y, lam)
    for a in range(len(y)):
        mates = [int(j) for j in torch.where(y == y[a])[0] if j != a]
        want = sorted(float((lam * x[a] @ x[p] + (1 - lam) * x[a] @ x[q])
                            / (lam * x[p] + (1 - lam) * x[q]).norm())
                      for p in mates for q in mates if p != q)
        got = sorted(s[a][member[a]].tolist())
        assert len(got) == len(want)
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float64),
                                   torch.tensor(want, dtype=torch.float64))


@pytest.mark.parametrize("name", mpp.LOSSES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_equals_reference(name, case, counted):
    x, y = make_case(case, seed=3)
    fused, ref = pair(name)
    assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x)
    assert counted  # the class blocks served it, not the reference's B × B × B tensor


@pytest.mark.parametrize("name", mpp.LOSSES)
def test_hyper_parameters_and_distances(name, counted):
    x, y = make_case(CASES[1], seed=4)
    fused, ref = pair(name, **HYPER[name])
    assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x)
    if name in ("ContrastiveLoss", "GeneralizedLiftedStructureLoss"):  # L2 by default
        cos = mo.distances.CosineSimilarity
        fused, ref = pair(name, distance=cos())
        assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x)


def test_float32_and_half(counted):
    x, y = make_case(CASES[1], seed=5)
    fused, ref = pair("MultiSimilarityLoss")
    assert_float32_and_bf16(lambda e: fused(e, y), lambda e: ref(e, y), x)


def test_large_class_falls_back_to_the_reference(monkeypatch, counted):
    monkeypatch.setattr(mpp, "MAX_ENTRIES", 100)  # 31 rows × K² (K ≥ 5) > 100
    x, y = make_case(CASES[1], seed=6)
    fused, ref = pair("ContrastiveLoss")
    assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x)
    assert counted  # consulted, found too large, and the reference ran


def test_batch_against_references_stays_on_the_reference(counted):
    """ref_emb (candidates among the references): not class blocks of the batch."""
    x, y = make_case(CASES[1], seed=7)
    r = torch.randn(9, x.shape[1], dtype=torch.float64)
    ry = torch.randint(0, 6, (9,))
    fused, ref = pair("MultiSimilarityLoss")
    torch.testing.assert_close(fused(x, y, ref_emb=r, ref_labels=ry),
                               ref(x, y, ref_emb=r, ref_labels=ry))
    assert not counted


def test_one_large_class_among_singletons():
    """One class of 40 and 60 singletons: the rows are B·K² (padded to the large class), not
    C·K³; the result as the reference's."""
    g = torch.Generator().manual_seed(10)
    y = torch.cat([torch.zeros(40, dtype=torch.long), torch.arange(1, 61)])
    y = y[torch.randperm(100, generator=g)]
    x = torch.randn(100, 6, dtype=torch.float64, generator=g)
    s, member = mpp.candidate_rows(F.normalize(x, dim=1), y, 0.3)
    assert s.shape == (100, 1600) and int(member.sum()) == 40 * 39 * 38
    fused, ref = pair("MultiSimilarityLoss")
    assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x)


@requires_triton
def test_triton_engine(counted):
    x, y = make_case(CASES[0], seed=8)
    x, y = on_dev(x, y)
    fused, ref = pair("MultiSimilarityLoss", backend="triton")
    assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x)
    assert counted


def test_big_batch_without_cubic_memory():
    """B = 3000 in classes of 6: the reference's candidate tensor would be 3000³ entries
    (216 GB in float64); the rows here are B·K² = 108 000. Values against the same
    classes computed one by one (each class alone is a batch the reference can take)."""
    g = torch.Generator().manual_seed(9)
    y = torch.arange(3000) // 6
    x = torch.randn(3000, 8, dtype=torch.float64, generator=g)
    mx = mo.Metrix(level="embedding", pairs="pos_pos", lam=0.4)
    from metrix_ops.reference.metrix import metrix_loss
    inp_all = mo.spec.LossInputs(x, y, None, x, y, True, mo.distances.CosineSimilarity())
    params = {"alpha": 2.0, "beta": 50.0, "base": 0.5}
    got = mpp.mixed_term("MultiSimilarityLoss", params, inp_all, 0.4)
    # MS's soft form is a mean over anchors: the mean of per-class references, equal sizes
    parts = []
    for c in range(0, 3000, 6 * 50):  # 50 classes at a time
        xs, ys = x[c:c + 300], y[c:c + 300]
        inp = mo.spec.LossInputs(xs, ys, None, xs, ys, True, mo.distances.CosineSimilarity())
        parts.append(metrix_loss("MultiSimilarityLoss", params, inp, mx, 0.4))
    torch.testing.assert_close(got, torch.stack(parts).mean())
