"""The loss option miner=: the loss over the pairs the miner keeps, as PML's two calls
`loss(x, y, miner(x, y))`. MultiSimilarityMiner with MultiSimilarityLoss runs inside the fused
op (two streaming passes, no index tuple); other miners give their index tuple to the loss."""
import pytest
import torch
from pytorch_metric_learning import losses as pl
from pytorch_metric_learning import miners as pm
from pytorch_metric_learning import reducers as pr

import metrix_ops as mo
from cases import CASE_IDS, CASES, assert_close_vg, make_case
from metrix_ops import _ext, fused

needs_ext = pytest.mark.skipif(not _ext.HAS_EXT, reason="extension not built")


def pml_mined(loss, miner):
    return lambda e, y, *ref: loss(e, y, miner(e, y, *ref), *ref)


@needs_ext
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("eps", [0.1, 0.5])
def test_ms_miner_in_the_fused_op_equals_pml(case, eps, monkeypatch):
    x, y = make_case(case)
    calls = []
    supports, impl = fused.MINER_IMPLS[("cpu", "MultiSimilarityLoss")]
    monkeypatch.setitem(fused.MINER_IMPLS, ("cpu", "MultiSimilarityLoss"),
                        (supports, lambda *a: calls.append(1) or impl(*a)))
    ours = mo.losses.MultiSimilarityLoss(backend="cpu", miner=mo.miners.MultiSimilarityMiner(eps))
    theirs = pml_mined(pl.MultiSimilarityLoss(), pm.MultiSimilarityMiner(eps))
    assert_close_vg(lambda e: ours(e, y), lambda e: theirs(e, y), x)
    assert calls, "the fused miner op was not used"


@needs_ext
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_ms_miner_fused_low_precision(dtype, rtol):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(57, 19, generator=g).to(dtype)
    y = torch.randint(0, 7, (57,), generator=g)
    ours = mo.losses.MultiSimilarityLoss(backend="cpu", miner=pm.MultiSimilarityMiner(0.1))
    theirs = pml_mined(pl.MultiSimilarityLoss(), pm.MultiSimilarityMiner(0.1))
    # PML in fp64 on the same values: our fp32 accumulation against the exact result
    assert_close_vg(lambda e: ours(e.to(dtype), y).double(), lambda e: theirs(e, y),
                    x.double(), rtol=rtol, atol=1e-5)


@needs_ext
@pytest.mark.parametrize("chunk", [1, 4, 64])
@pytest.mark.parametrize("same_set", [True, False])
def test_ms_miner_fused_with_references_and_chunks(chunk, same_set):
    from metrix_ops.fused.multi_similarity import miner_impl
    g = torch.Generator().manual_seed(chunk)
    x = torch.randn(21, 5, dtype=torch.float64, generator=g)
    y = torch.randint(0, 4, (21,), generator=g)
    r = torch.randn(17, 5, dtype=torch.float64, generator=g)
    ry = torch.randint(0, 5, (17,), generator=g)
    miner = mo.miners.MultiSimilarityMiner(0.2)
    loss = mo.losses.MultiSimilarityLoss(backend="cpu", miner=miner)
    theirs = pml_mined(pl.MultiSimilarityLoss(), pm.MultiSimilarityMiner(0.2))
    if same_set:
        assert_close_vg(lambda e: ours_chunked(loss, e, y, chunk), lambda e: theirs(e, y), x)
    else:
        assert_close_vg(lambda e, f: loss(e, y, ref_emb=f, ref_labels=ry),
                        lambda e, f: theirs(e, y, f, ry), x, r)
    del miner_impl


def ours_chunked(loss, e, y, chunk):
    """The module's call with the op's chunk (and the batch-against-itself op's block)
    forced, to cross chunk and block boundaries."""
    from metrix_ops.fused import multi_similarity as ms
    orig, block = ms.miner_impl, ms.MINED_SELF_BLOCK
    try:
        key = ("cpu", "MultiSimilarityLoss")
        fused.MINER_IMPLS[key] = (ms.miner_supports,
                                  lambda p, i, r, m: orig(p, i, r, m, chunk=chunk))
        ms.MINED_SELF_BLOCK = chunk
        return loss(e, y)
    finally:
        fused.MINER_IMPLS[key] = (ms.miner_supports, orig)
        ms.MINED_SELF_BLOCK = block


@needs_ext
@pytest.mark.parametrize("reducer", ["MeanReducer", "SumReducer", "AvgNonZeroReducer"])
def test_ms_miner_fused_reducers(reducer):
    x, y = make_case(CASES[1])
    ours = mo.losses.MultiSimilarityLoss(backend="cpu", miner=pm.MultiSimilarityMiner(0.1),
                                         reducer=getattr(pr, reducer)())
    theirs = pml_mined(pl.MultiSimilarityLoss(reducer=getattr(pr, reducer)()),
                       pm.MultiSimilarityMiner(0.1))
    assert_close_vg(lambda e: ours(e, y), lambda e: theirs(e, y), x)


def test_ms_miner_keeps_nothing_gives_zero_with_graph():
    # two rows of different classes: no positive anywhere, so the miner keeps nothing
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1])
    for backend in ("reference",) + (("cpu",) if _ext.HAS_EXT else ()):
        out = mo.losses.MultiSimilarityLoss(backend=backend, miner=mo.miners.MultiSimilarityMiner())(x, y)
        assert out.item() == 0 and out.requires_grad


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("loss_name,miner", [
    ("ContrastiveLoss", lambda: pm.MultiSimilarityMiner(0.2)),
    ("TripletMarginLoss", lambda: pm.TripletMarginMiner(0.1, type_of_triplets="semihard")),
    ("TripletMarginLoss", lambda: pm.BatchHardMiner()),
    ("MultiSimilarityLoss", lambda: pm.TripletMarginMiner(0.2, type_of_triplets="hard")),
])
def test_other_miners_give_their_index_tuple(backend, loss_name, miner):
    x, y = make_case(CASES[1])
    ours = getattr(mo.losses, loss_name)(backend=backend, miner=miner())
    theirs = pml_mined(getattr(pl, loss_name)(), miner())
    assert_close_vg(lambda e: ours(e, y), lambda e: theirs(e, y), x)


def test_miner_option_errors():
    x, y = make_case(CASES[0])
    loss = mo.losses.MultiSimilarityLoss(miner=mo.miners.MultiSimilarityMiner())
    with pytest.raises(ValueError, match="indices_tuple or the loss's miner="):
        loss(x, y, mo.miners.MultiSimilarityMiner()(x, y))
    with pytest.raises(ValueError, match="miner= and expansion="):
        mo.losses.HPHNTripletLoss(miner=pm.BatchHardMiner(), expansion=mo.Expansion())(x, y)
    with pytest.raises(TypeError, match="miner must be a miner module"):
        mo.losses.MultiSimilarityLoss(miner="hard")(x, y)
    with pytest.raises(ValueError, match="give the miner to CrossBatchMemory"):
        mo.losses.CrossBatchMemory(mo.losses.MultiSimilarityLoss(miner=pm.MultiSimilarityMiner()), 7)
    with pytest.raises(ValueError, match="does not take a miner"):
        mo.losses.HPHNTripletLoss(miner=pm.BatchHardMiner())(x, y)


@needs_ext
def test_ms_miner_op_bounds_and_counts():
    """The op's own outputs: each anchor's hardest pairs and the pairs it keeps, against the
    miner's mask."""
    import torch.nn.functional as F
    from metrix_ops.ops.ms_loss import ms_mined_rows, ms_mined_rows_self
    g = torch.Generator().manual_seed(5)
    x = F.normalize(torch.randn(30, 6, dtype=torch.float64, generator=g), dim=1)
    y = torch.randint(0, 4, (30,), generator=g)
    hn, hp = torch.ops.metrix_ops.ms_mine_bounds(x, x, y, y, True, 7)
    s = x @ x.t()
    same = y[:, None] == y[None, :]
    pos = same & ~torch.eye(30, dtype=torch.bool)
    torch.testing.assert_close(hn, s.masked_fill(same, -float("inf")).amax(1))
    torch.testing.assert_close(hp, s.masked_fill(~pos, float("inf")).amin(1))
    rows, kept = ms_mined_rows(x, x, y, y, True, 2.0, 50.0, 0.5, 0.1, 7)
    a1, p, a2, n = mo.miners.MultiSimilarityMiner(0.1)(x, y)
    assert kept[:, 0].tolist() == torch.bincount(a1, minlength=30).tolist()
    assert kept[:, 1].tolist() == torch.bincount(a2, minlength=30).tolist()
    # the batch-against-itself ops (symmetric blocks): the same bounds (up to the blocks'
    # rounding), counts and rows for blocks from one row to all
    for b in (1, 4, 7, 30, 64):
        hn_s, hp_s = torch.ops.metrix_ops.ms_mine_bounds_self(x, y, b)
        torch.testing.assert_close((hn_s, hp_s), (hn, hp), rtol=1e-14, atol=1e-14)
        rows_s, kept_s = ms_mined_rows_self(x, y, 2.0, 50.0, 0.5, 0.1, b)
        assert torch.equal(kept_s, kept)
        torch.testing.assert_close(rows_s, rows, rtol=1e-12, atol=1e-13)


@needs_ext
def test_ms_mined_ops_opcheck_and_bad_thresholds():
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(2)
    x = F.normalize(torch.randn(9, 4, dtype=torch.float64, generator=g), dim=1)
    y = torch.randint(0, 3, (9,), generator=g)
    hn, hp = torch.ops.metrix_ops.ms_mine_bounds(x, x, y, y, True, 4)
    torch.library.opcheck(torch.ops.metrix_ops.ms_mine_bounds.default, (x, x, y, y, True, 4))
    xg = x.clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.metrix_ops.ms_mined_fwd.default,
                          (xg, xg, y, y, hn, hp, True, 2.0, 50.0, 0.5, 0.1, 4))
    torch.library.opcheck(torch.ops.metrix_ops.ms_mine_bounds_self.default, (x, y, 4))
    torch.library.opcheck(torch.ops.metrix_ops.ms_mined_self_fwd.default,
                          (xg, y, hn, hp, 2.0, 50.0, 0.5, 0.1, 4))
    with pytest.raises(RuntimeError, match="hardest_neg"):
        torch.ops.metrix_ops.ms_mined_fwd(x, x, y, y, hn[:5], hp, True, 2.0, 50.0, 0.5, 0.1, 4)
    with pytest.raises(RuntimeError, match="hardest_pos"):
        torch.ops.metrix_ops.ms_mined_self_fwd(x, y, hn, hp[:3], 2.0, 50.0, 0.5, 0.1, 4)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.metrix_ops.ms_mined_self_fwd(x, y, hn.float(), hp.float(), 2.0, 50.0, 0.5,
                                               0.1, 4)
    with pytest.raises(RuntimeError, match="block"):
        torch.ops.metrix_ops.ms_mine_bounds_self(x, y, 0)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.metrix_ops.ms_mined_fwd(x, x, y, y, hn.float(), hp.float(), True, 2.0, 50.0,
                                          0.5, 0.1, 4)


@needs_ext
def test_ms_miner_fp32_kernels_at_every_simd_level():
    """The mined fp32 row kernels of every SIMD level (they mask the miner's thresholds, the
    self pair and the lane tails one comparison at a time): odd sizes put tails and self pairs
    at every lane position of 4, 8 and 16. The kept counts are the same comparisons on the
    same S at every level, so they must be equal; rows, loss and gradient against PML in
    float64."""
    import torch.nn.functional as F
    from test_fast_exp import LEVELS, simd_level
    from metrix_ops.ops.ms_loss import ms_mined_rows, ms_mined_rows_self
    g = torch.Generator().manual_seed(11)
    x = torch.randn(83, 21, generator=g)
    y = torch.randint(0, 6, (83,), generator=g)
    xu = F.normalize(x, dim=1)
    hn, hp = torch.ops.metrix_ops.ms_mine_bounds(xu, xu, y, y, True, 13)
    a1, _, a2, _ = pm.MultiSimilarityMiner(0.1)(x.double(), y)
    want = torch.stack([torch.bincount(a1, minlength=83), torch.bincount(a2, minlength=83)], 1)
    ours = mo.losses.MultiSimilarityLoss(backend="cpu", miner=mo.miners.MultiSimilarityMiner(0.1))
    theirs = pml_mined(pl.MultiSimilarityLoss(), pm.MultiSimilarityMiner(0.1))
    counts = {}
    for level in LEVELS:
        with simd_level(level):
            rows, kept = ms_mined_rows(xu, xu, y, y, True, 2.0, 50.0, 0.5, 0.1, 13)
            rows_s, kept_s = ms_mined_rows_self(xu, y, 2.0, 50.0, 0.5, 0.1, 13)
            assert torch.equal(kept_s, kept), level
            torch.testing.assert_close(rows_s, rows, rtol=1e-5, atol=1e-6)
            counts[level] = kept
            assert_close_vg(lambda e: ours(e.float(), y).double(), lambda e: theirs(e, y),
                            x.double(), rtol=1e-4, atol=1e-6)
    # fp32 similarities may round across a threshold that fp64's do not: a few pairs at most
    assert (counts[LEVELS[-1]] - want).abs().sum() <= 2
    for level in LEVELS:
        assert torch.equal(counts[level], counts[LEVELS[-1]]), level
