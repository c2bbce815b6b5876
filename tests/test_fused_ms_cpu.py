"""The fused CPU multi-similarity op against the reference: values and gradients over the
shared cases, chunk boundaries, references, reducers, dtypes; opcheck and torch.compile."""
import pytest
import torch
import torch.nn.functional as F

import metrix_ops as mo
from cases import CASE_IDS, CASES, assert_close_vg, make_case, value_and_grad
from metrix_ops import _ext

pytestmark = pytest.mark.skipif(not _ext.HAS_EXT, reason="extension not built")


def pair(**kw):
    return (mo.losses.MultiSimilarityLoss(backend="cpu", **kw),
            mo.losses.MultiSimilarityLoss(backend="reference", **kw))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("kw", [{}, {"alpha": 1.3, "beta": 20.0, "base": 0.3}])
def test_matches_reference_fp64(case, kw):
    x, y = make_case(case)
    fused, ref = pair(**kw)
    assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x)


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_chunk_boundaries(chunk):
    from metrix_ops.ops import ms_loss_rows
    g = torch.Generator().manual_seed(chunk)
    x = F.normalize(torch.randn(23, 6, dtype=torch.float64, generator=g), dim=1)
    y = torch.randint(0, 4, (23,), generator=g)

    def rows_fused(e):
        return ms_loss_rows(e, e, y, y, True, 2.0, 50.0, 0.5, chunk).sum()

    def rows_ref(e):
        from metrix_ops.reference.multi_similarity import multi_similarity_loss_dict
        from metrix_ops.spec import LossInputs
        # the op takes unit rows as given: compare with a similarity that does not renormalise
        inp = LossInputs(e, y, None, e, y, True, mo.distances.CosineSimilarity(normalize_embeddings=False))
        return multi_similarity_loss_dict(inp)["loss"]["losses"].sum()

    assert_close_vg(rows_fused, rows_ref, x)

    from metrix_ops.ops import ms_loss_rows_self
    w = torch.randn(23, dtype=torch.float64, generator=g)  # unequal row weights

    def rows_self(e):  # symmetric-block op: blocks of `chunk` rows
        return (ms_loss_rows_self(e, y, 2.0, 50.0, 0.5, chunk) * w).sum()

    def rows_ref_w(e):
        from metrix_ops.reference.multi_similarity import multi_similarity_loss_dict
        from metrix_ops.spec import LossInputs
        inp = LossInputs(e, y, None, e, y, True, mo.distances.CosineSimilarity(normalize_embeddings=False))
        return (multi_similarity_loss_dict(inp)["loss"]["losses"] * w).sum()

    assert_close_vg(rows_self, rows_ref_w, x)


def test_self_op_opcheck():
    x = F.normalize(torch.randn(11, 4), dim=1).requires_grad_()
    y = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 0])
    torch.library.opcheck(torch.ops.metrix_ops.ms_loss_self_fwd.default, (x, y, 2.0, 50.0, 0.5, 4))


def test_ref_emb_and_reducers():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(15, 8, dtype=torch.float64, generator=g)
    r = torch.randn(26, 8, dtype=torch.float64, generator=g)
    y, ry = torch.randint(0, 4, (15,), generator=g), torch.randint(0, 4, (26,), generator=g)
    for red in (None, mo.reducers.SumReducer(), mo.reducers.AvgNonZeroReducer()):
        fused, ref = pair(reducer=red)
        assert_close_vg(lambda e, f: fused(e, y, ref_emb=f, ref_labels=ry),
                        lambda e, f: ref(e, y, ref_emb=f, ref_labels=ry), x, r)
        assert_close_vg(lambda e, f: fused(e, y, ref_emb=f, ref_labels=y),
                        lambda e, f: ref(e, y, ref_emb=f, ref_labels=y), x, r[:15])


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_low_precision(dtype, tol):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 16, generator=g)
    y = torch.randint(0, 6, (40,), generator=g)
    fused, ref = pair()
    xd = x.to(dtype)
    ref_v = ref(xd.double(), y)
    out = fused(xd.clone().requires_grad_(), y)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    assert abs(float(out.detach()) - float(ref_v)) <= tol * abs(float(ref_v))


def test_large_beta_is_stable():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(2, 32, generator=g)
    x = base.repeat_interleave(8, 0) + 1e-3 * torch.randn(16, 32, generator=g)
    y = torch.tensor([0] * 8 + [1] * 8)
    fused, ref = pair(beta=400.0, alpha=100.0)
    out = fused(x, y)
    assert torch.isfinite(out)
    torch.testing.assert_close(out.double(), ref(x.double(), y), rtol=1e-4, atol=1e-6)


def test_falls_back_or_refuses_outside_its_scope():
    x, y = make_case(CASES[1])
    it = mo.miners.MultiSimilarityMiner()(x, y)
    auto = mo.losses.MultiSimilarityLoss(backend="auto")
    ref = mo.losses.MultiSimilarityLoss(backend="reference")
    torch.testing.assert_close(auto(x, y, it), ref(x, y, it))
    torch.testing.assert_close(mo.losses.MultiSimilarityLoss(backend="cpu")(x, y, it),
                               ref(x, y, it))  # an indices_tuple: fused/indices/
    # every loss of DESIGN §2 is fused on the CPU now: a loss the engine lacks is simulated
    from metrix_ops import backend as backend_mod
    with pytest.raises(NotImplementedError, match="backend='cpu' does not implement NewLoss"):
        backend_mod.resolve("cpu", "NewLoss", x.device)


def test_batch_as_ref_emb_with_other_labels_keeps_self_pairs_as_pml():
    """ref_emb=the batch but ref_labels a different tensor: PML keeps the self pairs (they are
    positives at s = 1), so the symmetric self op must not be used."""
    from pytorch_metric_learning.losses import MultiSimilarityLoss as PML

    x, y = make_case(CASES[1])
    got = mo.losses.MultiSimilarityLoss(backend="cpu")(x, y, ref_emb=x, ref_labels=y.clone())
    want = PML()(x, y, ref_emb=x, ref_labels=y.clone())
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    assert not torch.allclose(got, mo.losses.MultiSimilarityLoss(backend="cpu")(x, y))


def test_labels_far_apart_through_the_loss():
    """Label values near 2**62 (hashes, ids): the pair counts use the labels that occur, not
    an allocation sized by the label range."""
    x, y = make_case(CASES[1])
    big = y * (2 ** 60) + 7
    torch.testing.assert_close(mo.losses.MultiSimilarityLoss(backend="cpu")(x, big),
                               mo.losses.MultiSimilarityLoss(backend="reference")(x, y),
                               rtol=1e-6, atol=1e-9)


def test_opcheck_and_compile():
    x = F.normalize(torch.randn(9, 5), dim=1).requires_grad_()
    y = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3, 3])
    args = (x, x.detach().clone().requires_grad_(), y, y, True, 2.0, 50.0, 0.5, 4)
    torch.library.opcheck(torch.ops.metrix_ops.ms_loss_fwd.default, args)
    from metrix_ops.ops import ms_loss_rows

    def f(e):
        return ms_loss_rows(e, e, y, y, True, 2.0, 50.0, 0.5, 4).mean()

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), f(x))
    ga = torch.autograd.grad(compiled(x), x)[0]
    gb = torch.autograd.grad(f(x), x)[0]
    torch.testing.assert_close(ga, gb)


# ---- every SIMD level of the fp32 kernels (METRIX_OPS_SIMD), against the reference ----

from test_fast_exp import LEVELS, simd_level  # noqa: E402


def _fp32_case(b, d, classes, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g), torch.randint(0, classes, (b,), generator=g)


def _rel_close(a, b, tol):
    """Relative error of value and gradient, each against its own scale."""
    va, ga = value_and_grad(a[0], a[1])
    vb, gb = value_and_grad(b[0], b[1])
    assert abs(float(va) - float(vb)) <= tol * abs(float(vb)) + 1e-12
    scale = gb[0].abs().max().item()
    assert (ga[0].double() - gb[0]).abs().max().item() <= tol * scale + 1e-12


@pytest.mark.parametrize("level", LEVELS)
# odd sizes: lane tails of every width, self pairs at every lane position, several blocks
@pytest.mark.parametrize("b,d,classes", [(37, 9, 5), (70, 33, 9), (130, 17, 30), (6, 3, 1)])
@pytest.mark.parametrize("kw", [{}, {"alpha": 1.3, "beta": 20.0, "base": 0.3}])
def test_simd_levels_fp32(level, b, d, classes, kw):
    x, y = _fp32_case(b, d, classes, b)
    fused, ref = pair(**kw)
    with simd_level(level):
        _rel_close((lambda e: fused(e, y), x), (lambda e: ref(e.double(), y), x), 1e-4)


@pytest.mark.parametrize("level", LEVELS)
def test_simd_levels_blocks_and_refs(level):
    """Block/chunk sizes that split rows mid-vector, and the general op with ref_emb."""
    from metrix_ops.ops import ms_loss_rows, ms_loss_rows_self
    from metrix_ops.reference.multi_similarity import multi_similarity_loss_dict
    from metrix_ops.spec import LossInputs
    x, y = _fp32_case(53, 12, 7, 3)
    xu = F.normalize(x, dim=1)
    w = torch.randn(53, generator=torch.Generator().manual_seed(5))

    def ref(e):
        inp = LossInputs(e, y, None, e, y, True, mo.distances.CosineSimilarity(normalize_embeddings=False))
        return (multi_similarity_loss_dict(inp)["loss"]["losses"] * w.double()).sum()

    with simd_level(level):
        for blk in (1, 5, 16, 21, 64):
            _rel_close((lambda e: (ms_loss_rows_self(e, y, 2.0, 50.0, 0.5, blk) * w).sum(), xu),
                       (lambda e: ref(e.double()), xu), 1e-4)
            _rel_close((lambda e: (ms_loss_rows(e, e, y, y, True, 2.0, 50.0, 0.5, blk) * w).sum(), xu),
                       (lambda e: ref(e.double()), xu), 1e-4)
        r, ry = _fp32_case(29, 12, 7, 4)
        fused, refl = pair()
        _rel_close((lambda e: fused(e, y, ref_emb=r, ref_labels=ry), x),
                   (lambda e: refl(e.double(), y, ref_emb=r.double(), ref_labels=ry), x), 1e-4)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_simd_levels_half_inputs(level, dtype, tol):
    x, y = _fp32_case(45, 20, 6, 8)
    xd = x.to(dtype)
    fused, ref = pair()
    with simd_level(level):
        out = fused(xd.clone().requires_grad_(), y).detach()
    want = ref(xd.double(), y)
    assert out.dtype == torch.float32
    assert abs(float(out) - float(want)) <= tol * abs(float(want))


@pytest.mark.parametrize("level", LEVELS)
def test_simd_levels_large_beta_and_labels(level):
    """Exponents far past fp32's exp range need the max shift; labels beyond int32 are
    remapped, not truncated (2^32 + 1 and 1 are different classes)."""
    g = torch.Generator().manual_seed(4)
    base = torch.randn(2, 32, generator=g)
    x = base.repeat_interleave(8, 0) + 1e-3 * torch.randn(16, 32, generator=g)
    y = torch.tensor([0] * 8 + [1] * 8)
    big = torch.where(y == 0, torch.tensor(1), torch.tensor(2**32 + 1))
    fused, ref = pair(beta=400.0, alpha=100.0)
    from metrix_ops.ops import ms_loss_rows, ms_loss_rows_self
    xu = F.normalize(x, dim=1)
    with simd_level(level):
        out = fused(x, y)
        rows = ms_loss_rows_self(xu, y, 100.0, 400.0, 0.5, 5)
        rows_big = ms_loss_rows_self(xu, big, 100.0, 400.0, 0.5, 5)
        rows_big_ref = ms_loss_rows(xu, xu, big, big, True, 100.0, 400.0, 0.5, 5)
    assert torch.isfinite(out)
    torch.testing.assert_close(out.double(), ref(x.double(), y), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(rows_big, rows)
    torch.testing.assert_close(rows_big_ref, rows)

