"""The CPU op of MultiSimilarityLoss's embedding-level Metrix term against references
(csrc/cpu/metrix_refs_walk.h, ms_metrix_refs_cpu.cpp: per class its anchors' rows of X Rᵀ and
its positives' rows of R Rᵀ, the candidates in the in-batch op's kernels): the loss with
`ref_emb` against the reference, which builds the B × M × M candidate tensor, over the shared
edge cases, in one group and in one class per group; the op against the in-batch op (a bank
that is the batch, in any order, each anchor's own row excluded); against the PyTorch chunks
on a reference set of 3000 rows; fp32 and half inputs; opcheck; and its input errors."""
import pytest
import torch
import torch.nn.functional as F

import metrix_ops as mo
from cases import (CASE_IDS, CASES, assert_close_vg, assert_float32_and_bf16, make_case,
                   value_and_grad)
from metrix_ops import _ext
from metrix_ops.fused import metrix_refs as mr
from metrix_ops.fused import multi_similarity as fused_ms
from metrix_ops.fused import contrastive as fused_con
from metrix_ops.ops import contrastive_metrix as cm
from metrix_ops.ops import lse_mix, ms_metrix
from test_metrix_refs import check_refs as check_name_refs
from test_metrix_refs import pair as metrix_pair
from test_metrix_refs import large_reference_case, record_calls, refs_for

pytestmark = pytest.mark.skipif(not _ext.HAS_EXT, reason="extension not built")

HYPER = {"alpha": 3.0, "beta": 40.0, "base": 0.3}


# the losses whose mixed term alone comes from a refs op (the clean loss from the clean op),
# each with its options: Circle's defaults and other m, γ; Contrastive and GeneralizedLifted
# on the (normalised) L2 distance and on the cosine
LSE_LOSSES = {"CircleLoss": [{}, {"m": 0.3, "gamma": 40.0}],
              "ContrastiveLoss": [
                  {"pos_margin": 0.1, "neg_margin": 0.7},
                  {"distance": mo.distances.CosineSimilarity(), "pos_margin": 0.8,
                   "neg_margin": 0.3}],
              "GeneralizedLiftedStructureLoss": [
                  {"pos_margin": 0.2, "neg_margin": 0.9},
                  {"distance": mo.distances.CosineSimilarity(), "neg_margin": 0.3}]}


@pytest.fixture
def lse_calls(monkeypatch):
    """Each call of the Circle / GeneralizedLifted / Contrastive refs ops' rows."""
    calls = record_calls(monkeypatch, lse_mix, "lse_refs_rows")
    record_calls(monkeypatch, cm, "contrastive_metrix_refs_rows", calls)
    for module in (mr, fused_con):  # the modules that import the name
        monkeypatch.setattr(module, "contrastive_metrix_refs_rows", cm.contrastive_metrix_refs_rows)
    return calls


@pytest.fixture
def op_calls(monkeypatch):
    """The op's per-anchor rows, each time the loss (clean and mixed terms) or the Metrix
    term beside another clean path (mixed term only) called it."""
    calls = record_calls(monkeypatch, fused_ms, "ms_metrix_refs_rows")
    monkeypatch.setattr(mr, "ms_metrix_refs_rows", fused_ms.ms_metrix_refs_rows)
    return calls


def pair(pairs, **kw):
    return metrix_pair("MultiSimilarityLoss", pairs, **kw)


def check_refs(pairs, x, y, r, ry, **kw):
    check_name_refs("MultiSimilarityLoss", pairs, x, y, r, ry, **kw)


# group sizes: one class and one reference column per tile; a few columns per tile; all
GROUPS = [1, 40, None]


@pytest.mark.parametrize("group", GROUPS, ids=["column_tiles", "small_tiles", "one_group"])
@pytest.mark.parametrize("pairs", ["pos_neg", "anchor_neg"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_ref_emb_equals_reference(case, pairs, group, op_calls, monkeypatch):
    if group is not None:
        monkeypatch.setattr(ms_metrix, "GROUP_ENTRIES", group)
    x, y = make_case(case, seed=3)
    r, ry = refs_for(x, y, seed=4)
    check_refs(pairs, x, y, r, ry)
    check_refs(pairs, x, y, r, ry, **HYPER)
    assert op_calls


@pytest.mark.parametrize("group", GROUPS, ids=["column_tiles", "small_tiles", "one_group"])
@pytest.mark.parametrize("pairs", ["pos_neg", "anchor_neg"])
@pytest.mark.parametrize("name", LSE_LOSSES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_lse_losses_ref_emb_equals_reference(case, name, pairs, group, lse_calls, monkeypatch):
    """Circle, Contrastive and GeneralizedLifted (L2 and cosine): their clean ops against
    references and their mixed terms from the refs ops (lse_mix_refs_cpu.cpp,
    contrastive_metrix_refs_cpu.cpp)"""
    if group is not None:
        monkeypatch.setattr(ms_metrix, "GROUP_ENTRIES", group)
    x, y = make_case(case, seed=23)
    r, ry = refs_for(x, y, seed=24)
    for kw in LSE_LOSSES[name]:
        check_name_refs(name, pairs, x, y, r, ry, **kw)
    assert lse_calls


# the reducers each loss's clean term takes from the walk: every one the ops express; for
# Contrastive also a window holding 0, which counts zero terms (and would count an anchor's
# own row, were it taken for a pair)
WALK_REDUCERS = {"ContrastiveLoss": {None: None, "mean": mo.reducers.MeanReducer(),
                                     "sum": mo.reducers.SumReducer(),
                                     "threshold": mo.reducers.ThresholdReducer(0.05, 0.9),
                                     "threshold_zeros": mo.reducers.ThresholdReducer(-0.5, 0.9)},
                 "CircleLoss": {None: None, "mean": mo.reducers.MeanReducer(),
                                "sum": mo.reducers.SumReducer(),
                                "threshold": mo.reducers.ThresholdReducer(0.5, 30.0)},
                 "GeneralizedLiftedStructureLoss": {
                     None: None, "sum": mo.reducers.SumReducer(),
                     "threshold": mo.reducers.ThresholdReducer(0.2, 2.5)}}


@pytest.fixture
def walk_calls(monkeypatch):
    """(walk, clean): the calls of each loss's refs op with its clean terms, and of its
    clean op (none expected)"""
    import metrix_ops.fused.circle as fused_circle
    import metrix_ops.fused.generalized_lifted as fused_gl
    import metrix_ops.ops.contrastive as clean_ops
    clean = record_calls(monkeypatch, clean_ops, "contrastive_rows")
    monkeypatch.setattr(fused_con, "contrastive_rows", clean_ops.contrastive_rows)
    record_calls(monkeypatch, fused_circle, "circle_rows", clean)
    record_calls(monkeypatch, fused_gl, "gen_lifted_rows", clean)
    walk = record_calls(monkeypatch, fused_con, "contrastive_metrix_refs_rows")
    record_calls(monkeypatch, fused_circle, "circle_metrix_terms", walk)
    record_calls(monkeypatch, fused_gl, "lifted_metrix_terms", walk)
    return walk, clean


@pytest.mark.parametrize("group", [1, None], ids=["column_tiles", "one_group"])
@pytest.mark.parametrize("name,reducer", [(n, r) for n in WALK_REDUCERS for r in WALK_REDUCERS[n]])
def test_clean_terms_in_the_walk(name, reducer, group, walk_calls, monkeypatch):
    """Contrastive, Circle and GeneralizedLifted with Metrix against references: their clean
    terms come from the refs op's walk (no clean op of their own), under each reducer,
    against the reference; references of other classes, and a copy of the batch (each
    anchor's own row no pair: for L2 a duplicate at distance 0)"""
    if group is not None:
        monkeypatch.setattr(ms_metrix, "GROUP_ENTRIES", group)
    red = WALK_REDUCERS[name][reducer]
    x, y = make_case(CASES[6], seed=31)
    r, ry = refs_for(x, y, seed=32)
    for kw in LSE_LOSSES[name]:
        for pairs in ("pos_neg", "anchor_neg"):
            check_name_refs(name, pairs, x, y, r, ry, reducer=red, **kw)
            fused, ref = metrix_pair(name, pairs, reducer=red, **kw)
            assert_close_vg(lambda e, q: fused(e, y, ref_emb=q, ref_labels=y),
                            lambda e, q: ref(e, y, ref_emb=q, ref_labels=y), x,
                            x.detach() * 1.0)
    walk, clean = walk_calls
    assert len(walk) == 8 and not clean
    # the walk gave clean terms: Contrastive's positive counts, the others' finite lse⁺
    assert all(float(c[0][1].sum()) > 0 if name == "ContrastiveLoss"
               else torch.isfinite(c[2]).any() for c in walk)


@pytest.mark.parametrize("name", LSE_LOSSES)
def test_lse_losses_copy_of_the_batch_and_half(name, lse_calls):
    """the same set (own rows excluded) against the reference; fp32 and bf16 inputs"""
    x, y = make_case(CASES[6], seed=25)
    fused, ref = metrix_pair(name, "pos_neg")
    assert_close_vg(lambda e, q: fused(e, y, ref_emb=q, ref_labels=y),
                    lambda e, q: ref(e, y, ref_emb=q, ref_labels=y), x, x.detach() * 1.0)
    r, ry = refs_for(x, y, seed=26)
    rd = r.detach().to(torch.bfloat16).double()  # the same values whatever e's dtype
    v64, (g64,) = value_and_grad(lambda e: ref(e, y, ref_emb=rd, ref_labels=ry), x)
    v32, (g32,) = value_and_grad(lambda e: fused(e.float(), y, ref_emb=rd.float(), ref_labels=ry),
                                 x)
    # γ = 80 amplifies fp32 rounding in the gradient's cancelling terms: its tolerance is
    # relative to the gradient's scale
    torch.testing.assert_close(v32.double(), v64, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g32.double(), g64, rtol=1e-4, atol=1e-5 * float(g64.abs().max()))
    h = x.detach().to(torch.bfloat16).requires_grad_()
    v = fused(h, y, ref_emb=rd.to(torch.bfloat16), ref_labels=ry)
    v.backward()
    assert v.dtype == torch.float32 and torch.isfinite(h.grad.float()).all()
    torch.testing.assert_close(v, ref(h.detach().float(), y, ref_emb=rd.float(), ref_labels=ry),
                               rtol=1e-4, atol=1e-5)
    assert lse_calls


def test_references_without_a_class_of_the_batch(op_calls):
    """no anchor has a positive among the references (each mixes itself), and a reference
    set of one class that is the anchors' own (no candidate: the term is 0)"""
    x, y = make_case(CASES[1], seed=5)
    g = torch.Generator().manual_seed(6)
    r = torch.randn(9, x.shape[1], dtype=x.dtype, generator=g)
    check_refs("pos_neg", x, y, r, y.max() + 1 + torch.arange(9) % 3)
    one = torch.zeros(5, dtype=torch.long)
    check_refs("pos_neg", x[:4], one[:4], r[:5], one)
    assert len(op_calls) == 2


def _bank_rows(xu, y, perm, pairs, group=None):
    """The op's (clean rows, mixed rows) for the batch against a bank holding it in the
    order perm (each anchor's own row excluded)."""
    own = torch.empty_like(perm)
    own[perm] = torch.arange(len(perm))
    return ms_metrix.ms_metrix_refs_rows(xu, xu[perm], y, y[perm], own, 2.0, 50.0, 0.5, 0.3,
                                         pairs, group=group)


@pytest.mark.parametrize("pairs", ["pos_neg", "anchor_neg"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_a_bank_that_is_the_batch_equals_the_in_batch_op(case, pairs):
    """The batch against itself through the references op, the bank in any order, equals
    the in-batch op (its own walk over the symmetric S), clean and mixed rows, values and
    gradient."""
    x, y = make_case(case, seed=7)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(8))
    w = torch.rand(len(y), generator=torch.Generator().manual_seed(9), dtype=x.dtype)

    def in_batch(e):
        rows, mix = ms_metrix.ms_metrix_rows(F.normalize(e, dim=1), y, 2.0, 50.0, 0.5, 0.3, pairs)
        return (w * rows).sum() + (mix * w.flip(0)).sum()

    for group in GROUPS:
        def bank(e, group=group):
            rows, mix = _bank_rows(F.normalize(e, dim=1), y, perm, pairs, group)
            return (w * rows).sum() + (mix * w.flip(0)).sum()
        assert_close_vg(bank, in_batch, x)


def test_batch_against_itself_with_an_indices_tuple(op_calls):
    """Metrix beside a miner's tuple: the clean loss on the tuple, the mixed term (same_set:
    no self pair) from the op"""
    x, y = make_case(CASES[1], seed=10)
    a, p, n = mo.miners.TripletMarginMiner(margin=0.3)(x.detach(), y)
    fused, ref = pair("pos_neg")
    assert_close_vg(lambda e: fused(e, y, (a, p, n)), lambda e: ref(e, y, (a, p, n)), x)
    assert op_calls


def test_large_reference_set_equals_the_chunks(monkeypatch):
    """B = 64 against M = 3000 references in classes of 6 (the reference's candidate tensor
    would be 4.6 GB), small groups: the op against the PyTorch chunks, values and both
    gradients."""
    x, y, r, ry, mx, params = large_reference_case()

    def term(e, q):
        inp = mo.spec.LossInputs(e, y, None, q, ry, False, mo.distances.CosineSimilarity())
        return mr.mixed_term("MultiSimilarityLoss", params, inp, mx, 0.4)

    def chunks(e, q):  # the same term with the op switched off
        with monkeypatch.context() as m:
            m.setattr(mr, "_fused_term", lambda *a: None)
            return term(e, q)

    monkeypatch.setattr(ms_metrix, "GROUP_ENTRIES", 5000)  # a class a group, column chunks
    assert_close_vg(term, chunks, x, r, rtol=1e-9, atol=1e-12)


def test_float32_and_half(op_calls):
    x, y = make_case(CASES[1], seed=11)
    r, ry = refs_for(x, y, seed=12)
    fused, ref = pair("pos_neg")
    rd = r.detach()
    assert_float32_and_bf16(lambda e: fused(e, y, ref_emb=rd.to(e.dtype), ref_labels=ry),
                            lambda e: ref(e, y, ref_emb=rd.to(e.dtype), ref_labels=ry), x)
    h = x.detach().half()  # fp16 too: computed in fp32
    torch.testing.assert_close(fused(h, y, ref_emb=rd.half(), ref_labels=ry),
                               ref(h.float(), y, ref_emb=rd.half().float(), ref_labels=ry),
                               rtol=1e-4, atol=1e-5)
    assert op_calls and all(m.dtype == torch.float32 for _, m in op_calls)


@pytest.mark.parametrize("name", ["MultiSimilarityLoss", *LSE_LOSSES])
def test_references_without_grad(name, monkeypatch):
    """a detached bank: the backward ops are asked for dX only (no dR products), and dX is
    the reference's"""
    asked = []
    for op in ("ms", "circle", "lifted", "contrastive"):
        real = getattr(torch.ops.metrix_ops, f"{op}_metrix_refs_bwd")

        def spy(*args, real=real):
            asked.append(args[-1])  # need_dr, the last argument of every refs backward
            return real(*args)
        monkeypatch.setattr(torch.ops.metrix_ops, f"{op}_metrix_refs_bwd", spy)
    x, y = make_case(CASES[0], seed=13)
    r, ry = refs_for(x, y, seed=14)
    fused, ref = metrix_pair(name, "pos_neg")
    rd = r.detach()
    assert_close_vg(lambda e: fused(e, y, ref_emb=rd, ref_labels=ry),
                    lambda e: ref(e, y, ref_emb=rd, ref_labels=ry), x)
    assert asked and not any(asked)
    asked.clear()
    assert_close_vg(lambda e, q: fused(e, y, ref_emb=q, ref_labels=ry),
                    lambda e, q: ref(e, y, ref_emb=q, ref_labels=ry), x, r)
    assert asked and all(asked)


def _op_args(b=7, m=9, d=4, seed=15):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(b, d, dtype=torch.float64, generator=g), dim=1)
    r = F.normalize(torch.randn(m, d, dtype=torch.float64, generator=g), dim=1)
    y = torch.sort(torch.randint(0, 3, (b,), generator=g)).values
    ry = torch.sort(torch.randint(0, 4, (m,), generator=g)).values
    return x, r, y, ry, torch.full((b,), -1, dtype=torch.long)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    """every refs op: fake kernel (shapes and dtypes), autograd, schema"""
    x, r, y, ry, own = _op_args()
    x, r = x.to(dtype).requires_grad_(), r.to(dtype).requires_grad_()
    assert (ry == y[0]).any()
    own[0] = int((ry == y[0]).nonzero()[0])  # one own row
    ops = torch.ops.metrix_ops
    for anchor_neg in (False, True):
        tail = (0.3, anchor_neg)
        for clean in (False, True):
            torch.library.opcheck(ops.ms_metrix_refs_fwd,
                                  (x, r, y, ry, own, 2.0, 50.0, 0.5, *tail, clean, 1))
        for clean in (False, True):
            torch.library.opcheck(ops.circle_metrix_refs_fwd,
                                  (x, r, y, ry, own, 0.4, 20.0, *tail, clean, 1))
        for cosine in (False, True):
            for clean in (False, True):
                torch.library.opcheck(ops.lifted_metrix_refs_fwd,
                                      (x, r, y, ry, own, cosine, 0.1, 0.8, *tail, clean, 1))
            for clean, low, high in ((False, -float("inf"), float("inf")), (True, 0.0, 0.6)):
                torch.library.opcheck(ops.contrastive_metrix_refs_fwd,
                                      (x, r, y, ry, own, cosine, 0.1, 0.8, *tail, clean, low,
                                       high, 1))


def test_input_errors():
    x, r, y, ry, own = _op_args()
    op = torch.ops.metrix_ops.ms_metrix_refs_fwd
    with pytest.raises(RuntimeError, match="ref_labels must be sorted"):
        op(x, r, y, ry.flip(0), own, 2.0, 50.0, 0.5, 0.3, False, True, 64)
    with pytest.raises(RuntimeError, match="labels must be sorted"):
        op(x, r, y.flip(0), ry, own, 2.0, 50.0, 0.5, 0.3, False, True, 64)
    bad = own.clone()
    bad[0] = int((ry != y[0]).nonzero()[0])  # a reference of another label
    with pytest.raises(RuntimeError, match="self: anchor 0"):
        op(x, r, y, ry, bad, 2.0, 50.0, 0.5, 0.3, False, True, 64)
    with pytest.raises(RuntimeError, match="lam must be in"):
        op(x, r, y, ry, own, 2.0, 50.0, 0.5, 1.5, False, True, 64)
    with pytest.raises(RuntimeError, match="same D"):
        op(x, r[:, :3], y, ry, own, 2.0, 50.0, 0.5, 0.3, False, True, 64)
    with pytest.raises(RuntimeError, match="group must be > 0"):
        op(x, r, y, ry, own, 2.0, 50.0, 0.5, 0.3, False, True, 0)


@pytest.mark.parametrize("pairs", ["pos_neg", "anchor_neg"])
def test_a_copy_of_the_batch_with_its_labels(pairs, op_calls):
    """ref_emb a copy of the batch and ref_labels the labels themselves: PML's same set, so
    row i's own column is no pair (the op's self rows), against the reference"""
    for case in (CASES[0], CASES[6], CASES[7]):
        x, y = make_case(case, seed=16)
        fused, ref = pair(pairs)
        assert_close_vg(lambda e, q: fused(e, y, ref_emb=q, ref_labels=y),
                        lambda e, q: ref(e, y, ref_emb=q, ref_labels=y), x, x.detach() * 1.0)
    assert len(op_calls) == 3


@pytest.mark.parametrize("name", LSE_LOSSES)
def test_lse_losses_beside_an_indices_tuple(name, lse_calls):
    """the clean loss on a miner's tuple, the mixed term (same set) from the refs ops"""
    x, y = make_case(CASES[1], seed=27)
    a, p, n = mo.miners.TripletMarginMiner(margin=0.3)(x.detach(), y)
    for kw in LSE_LOSSES[name]:
        fused, ref = metrix_pair(name, "pos_neg", **kw)
        assert_close_vg(lambda e: fused(e, y, (a, p, n)), lambda e: ref(e, y, (a, p, n)), x)
    assert len(lse_calls) == len(LSE_LOSSES[name])


@pytest.mark.parametrize("name", ["MultiSimilarityLoss", *LSE_LOSSES])
def test_empty_batch_and_empty_references(name):
    """an empty batch or an empty reference set: PML's zero loss with zero gradients, before
    any op runs (test_empty_batch.py covers the clean losses)"""
    g = torch.Generator().manual_seed(28)
    x = torch.randn(6, 5, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (6,), generator=g)
    for loss in metrix_pair(name, "pos_neg"):
        for e, q in ((x[:0], x), (x, x[:0])):
            e, q = e.clone().requires_grad_(), q.clone().requires_grad_()
            ye, yq = y[:len(e)], y[:len(q)].clone()
            v = loss(e, ye, ref_emb=q, ref_labels=yq)
            assert v.item() == 0.0
            assert not any(t.any() for t in torch.autograd.grad(v, (e, q)))


def test_nan_references_are_rejected():
    x, y = make_case(CASES[0], seed=29)
    r, ry = refs_for(x, y, seed=30)
    r = r.detach().clone()
    r[2, 1] = float("nan")
    fused, _ = pair("pos_neg")
    with pytest.raises(ValueError, match="NaN"):
        fused(x, y, ref_emb=r, ref_labels=ry)


@pytest.mark.parametrize("name", ["MultiSimilarityLoss", *LSE_LOSSES])
def test_under_fullgraph_compile_equals_eager(name):
    """the module with Metrix against references traces whole (sorting, the refs ops, the
    soft form's reduction), values and both gradients as eager"""
    torch._dynamo.reset()
    loss = getattr(mo.losses, name)(metrix=mo.Metrix(lam=0.3))
    g = torch.Generator().manual_seed(32)
    x, r = torch.randn(13, 6, generator=g), torch.randn(17, 6, generator=g)
    y, ry = torch.randint(0, 4, (13,), generator=g), torch.randint(0, 5, (17,), generator=g)
    compiled = torch.compile(lambda e, q: loss(e, y, ref_emb=q, ref_labels=ry), fullgraph=True,
                             backend="eager")
    assert_close_vg(compiled, lambda e, q: loss(e, y, ref_emb=q, ref_labels=ry), x, r,
                    rtol=1e-5, atol=1e-6)
