"""The embedding-level Metrix term against references on CUDA tensors (fused/cuda_metrix_refs.py
on the refs ops of csrc/cuda/ms_metrix_cuda.cu, contrastive_metrix_cuda.cu and
lse_metrix_cuda.cu, engine cuda/metrix_rows.cuh): MultiSimilarity, Circle, Contrastive and
GeneralizedLifted with `ref_emb` against the reference (which builds the B × M × M candidate
tensor) over the shared edge cases, reference sets sharing only some classes with the batch,
chunks of one class and of many; each op against the CPU refs op per anchor, values and
both gradients; a copy of the batch with its labels (own rows), an indices_tuple beside
Metrix, a detached bank (no dR), CrossBatchMemory, λ at 0 and 1, references of no batch
class, the empty reference set, fp32 and half, fullgraph compile, opcheck and bad input;
the Triton engine's calls keep the PyTorch chunks. Skipped without a GPU and the compiled
CUDA kernels."""
import pytest
import torch
import torch.nn.functional as F

import metrix_ops as mo
from cases import CASE_IDS, CASES, assert_close_vg, make_case, value_and_grad
from metrix_ops import _ext
from metrix_ops.fused import cuda_metrix_refs as cmr
from metrix_ops.fused import metrix_refs as mr
from metrix_ops.ops.ms_metrix import refs_sorted
from test_metrix_refs import pair, record_calls, refs_for

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and _ext.HAS_CUDA_EXT),
                                reason="needs a CUDA device and the compiled CUDA kernels")

COS = mo.distances.CosineSimilarity
LOSSES = [("MultiSimilarityLoss", {}),
          ("MultiSimilarityLoss", {"alpha": 3.0, "beta": 40.0, "base": 0.3}),
          ("CircleLoss", {}), ("CircleLoss", {"m": 0.3, "gamma": 40.0}),
          ("ContrastiveLoss", {"pos_margin": 0.1, "neg_margin": 0.7}),
          ("ContrastiveLoss", {"distance": COS(), "pos_margin": 0.8, "neg_margin": 0.3}),
          ("GeneralizedLiftedStructureLoss", {"pos_margin": 0.2, "neg_margin": 0.9}),
          ("GeneralizedLiftedStructureLoss", {"distance": COS(), "neg_margin": 0.3})]
LOSS_IDS = ["ms", "ms_kw", "circle", "circle_kw", "con", "con_cos", "gen_lifted",
            "gen_lifted_cos"]


@pytest.fixture(autouse=True)
def _fp32_products(no_tf32):  # conftest.py
    pass


@pytest.fixture
def op_calls(monkeypatch):
    """The CUDA refs ops' outputs, each time the driver reached them."""
    return record_calls(monkeypatch, cmr, "refs_rows")


def cuda_pair(name, pairs, lam=0.35, **kw):
    return pair(name, pairs, backend="cuda", lam=lam, **kw)


def check(name, pairs, x, y, r, ry, lam=0.35, **kw):
    fused, ref = cuda_pair(name, pairs, lam=lam, **kw)
    assert_close_vg(lambda e, q: fused(e, y, ref_emb=q, ref_labels=ry),
                    lambda e, q: ref(e, y, ref_emb=q, ref_labels=ry), x, r)


def on_cuda(*ts):
    return [t.detach().cuda() for t in ts]


@pytest.mark.parametrize("chunk", [1, 4096], ids=["class_chunks", "one_chunk"])
@pytest.mark.parametrize("pairs", ["pos_neg", "anchor_neg"])
@pytest.mark.parametrize("name,kw", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_ref_emb_equals_reference(case, name, kw, pairs, chunk, op_calls, monkeypatch):
    monkeypatch.setattr(cmr, "CHUNK", chunk)
    x, y = make_case(case, seed=3)
    r, ry = refs_for(x, y, seed=4)
    x, y, r, ry = on_cuda(x, y, r, ry)
    check(name, pairs, x, y, r, ry, **kw)
    assert op_calls


@pytest.mark.gpu_only  # the Triton engine does not take the emulator's CUDA tensors
def test_the_triton_engine_keeps_the_chunks(op_calls):
    """beside Triton's clean loss the mixed term stays in the anchor chunks (the refs ops
    serve backend="cuda" until measured), with the reference's values"""
    pytest.importorskip("triton")
    x, y = make_case(CASES[1], seed=19)
    r, ry = refs_for(x, y, seed=20)
    fused, ref = pair("MultiSimilarityLoss", "pos_neg", backend="triton")
    x, y, r, ry = on_cuda(x, y, r, ry)
    assert_close_vg(lambda e, q: fused(e, y, ref_emb=q, ref_labels=ry),
                    lambda e, q: ref(e, y, ref_emb=q, ref_labels=ry), x, r)
    assert not op_calls


@pytest.mark.parametrize("name", ["MultiSimilarityLoss", "ContrastiveLoss", "CircleLoss",
                                  "GeneralizedLiftedStructureLoss"])
def test_cross_batch_memory_with_metrix(name, op_calls):
    """CrossBatchMemory wrapping a backend="cuda" loss with Metrix: the term against the bank
    from the refs ops (each anchor's own slot excluded), over calls that fill and wrap the
    bank, against the clean reference module plus the reference's Metrix term"""
    from test_cross_batch_memory import _batches, _expected_with_metrix
    mx = mo.Metrix(level="embedding", pairs="pos_neg", weight=0.6)
    mod = mo.losses.CrossBatchMemory(getattr(mo.losses, name)(backend="cuda", metrix=mx), 5,
                                     memory_size=23).cuda()
    clean = mo.losses.CrossBatchMemory(getattr(mo.losses, name)(backend="reference"), 5,
                                       memory_size=23).cuda()
    for k, (x, y) in enumerate(_batches([7, 9, 8, 11, 5], 5, 4, seed=31)):
        lam = 0.2 + 0.1 * k
        x, y = x.cuda().requires_grad_(True), y.cuda()
        want = _expected_with_metrix(clean, name, x, y, lam, "pos_neg", 0.6)
        (g_want,) = torch.autograd.grad(want, x)
        got = mod(x, y, lam=lam)
        (g_got,) = torch.autograd.grad(got, x)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(g_got, g_want, rtol=1e-6, atol=1e-9)
    assert len(op_calls) == 5


@pytest.mark.parametrize("lam", [0.0, 1.0])
@pytest.mark.parametrize("name,kw", LOSSES[::2], ids=LOSS_IDS[::2])
def test_lam_at_the_ends(lam, name, kw, op_calls):
    x, y = make_case(CASES[1], seed=5)
    r, ry = refs_for(x, y, seed=6)
    for pairs in ("pos_neg", "anchor_neg"):
        check(name, pairs, *on_cuda(x, y, r, ry), lam=lam, **kw)
    assert len(op_calls) == (0 if name == "CircleLoss" else 2)  # Circle: 0 before any op


# per CUDA refs op and constants: the CPU refs op, which of its outputs the CUDA op returns
# (in order: MS's ℓ̃ and its two log normalisers, the lse ops' candidate lses, Contrastive's
# mixed sums and counts; λ inside (0, 1), where MS's normalisers agree), and the CPU op's
# arguments after anchor_neg (no clean terms)
def _op_cases():
    return [("ms_metrix_mix_refs", "ms_metrix_refs", (2.5, 45.0, 0.4), (3, 4, 5), (False,)),
            ("circle_metrix_mix_refs", "circle_metrix_refs", (0.3, 40.0), (0, 1), (False,)),
            ("lifted_metrix_mix_refs", "lifted_metrix_refs", (False, 0.2, 0.9), (0, 1),
             (False,)),
            ("lifted_metrix_mix_refs", "lifted_metrix_refs", (True, 0.6, 0.3), (0, 1),
             (False,)),
            ("contrastive_metrix_mix_refs", "contrastive_metrix_refs", (False, 0.1, 0.7),
             (4, 5, 6, 7), (False, -float("inf"), float("inf"))),
            ("contrastive_metrix_mix_refs", "contrastive_metrix_refs", (True, 0.8, 0.3),
             (4, 5, 6, 7), (False, -float("inf"), float("inf")))]


def _weighted(outs, w):
    """a scalar of the ops' float outputs, each row weighted (so that every anchor's
    gradient counts apart)"""
    return sum((o * w * (k + 1)).sum() for k, o in enumerate(outs) if o.is_floating_point())


@pytest.mark.parametrize("chunk", [1, 3, 4096])
@pytest.mark.parametrize("anchor_neg", [False, True])
@pytest.mark.parametrize("own_rows", [False, True], ids=["bank", "copy_of_batch"])
@pytest.mark.parametrize("cuda_op,cpu_op,consts,picks,cpu_extra", _op_cases(),
                         ids=["ms", "circle", "lifted_l2", "lifted_cos", "con_l2", "con_cos"])
def test_ops_equal_the_cpu_ops(cuda_op, cpu_op, consts, picks, cpu_extra, own_rows, anchor_neg,
                               chunk):
    """per anchor, every output (Contrastive's counts exactly) and the gradients of x and r,
    in fp64: references with a duplicate row, an antipodal row, classes absent from either
    side; or a copy of the batch with its own rows"""
    g = torch.Generator().manual_seed(chunk + 7 * anchor_neg)
    b, m, d = 17, 23, 6
    x = F.normalize(torch.randn(b, d, dtype=torch.float64, generator=g), dim=1)
    y = torch.randint(0, 5, (b,), generator=g)
    if own_rows:
        r, ry, own = x.clone(), y.clone(), torch.arange(b)
    else:
        r = F.normalize(torch.randn(m, d, dtype=torch.float64, generator=g), dim=1)
        ry = torch.randint(1, 7, (m,), generator=g)
        r[1], ry[1] = r[0], ry[0]  # a duplicate reference
        r[2] = -x[0]  # antipodal to an anchor
        own = torch.full((b,), -1)
    args = refs_sorted(x, r, y, ry, own)[:5]
    w = torch.rand(b, dtype=torch.float64, generator=g)
    tail = (0.35, anchor_neg)
    cpu = getattr(torch.ops.metrix_ops, f"{cpu_op}_fwd")
    cud = getattr(torch.ops.metrix_ops, f"{cuda_op}_fwd")

    def on_cpu(xs, rs):
        out = cpu(xs, rs, *args[2:], *consts, *tail, *cpu_extra, 64)
        return [out[k] for k in picks]

    def on_gpu(xs, rs):
        ys, rys, owns = (t.cuda() for t in args[2:])
        return [o.cpu() for o in cud(xs.cuda(), rs.cuda(), ys, rys, owns, *consts, *tail, chunk)]

    want, got = on_cpu(*args[:2]), on_gpu(*args[:2])
    for k, (a, e) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12, msg=lambda s, k=k: f"out {k}: {s}")
    assert_close_vg(lambda xs, rs: _weighted(on_gpu(xs, rs), w),
                    lambda xs, rs: _weighted(on_cpu(xs, rs), w), *args[:2])


def test_chunks_cut_between_classes_equal_one_chunk(monkeypatch):
    """a class of 70 anchors with 40 positives (larger than any chunk), classes straddling
    the chunk target, singletons: small chunks against one chunk, values and both
    gradients"""
    g = torch.Generator().manual_seed(8)
    y = torch.cat([torch.zeros(70, dtype=torch.long), torch.randint(1, 12, (50,), generator=g)])
    ry = torch.cat([torch.zeros(40, dtype=torch.long), torch.randint(1, 15, (60,), generator=g)])
    x = torch.randn(120, 16, dtype=torch.float64, generator=g).cuda()
    r = torch.randn(100, 16, dtype=torch.float64, generator=g).cuda()
    y, ry = y.cuda(), ry.cuda()
    for name, kw in LOSSES[::2]:
        fused = cuda_pair(name, "pos_neg", **kw)[0]

        def term(e, q, fused=fused):
            return fused(e, y, ref_emb=q, ref_labels=ry)

        values = []
        for chunk in (10, 4096):
            monkeypatch.setattr(cmr, "CHUNK", chunk)
            values.append(value_and_grad(term, x, r))
        (va, ga), (vb, gb) = values
        torch.testing.assert_close(va, vb, rtol=1e-9, atol=1e-12)
        for a, e in zip(ga, gb):
            torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("pairs", ["pos_neg", "anchor_neg"])
@pytest.mark.parametrize("name,kw", LOSSES[::2], ids=LOSS_IDS[::2])
def test_a_copy_of_the_batch_with_its_labels(name, kw, pairs, op_calls):
    """ref_emb a copy of the batch, ref_labels the labels themselves: PML's same set, each
    anchor's own row neither a pair nor a positive"""
    for case in (CASES[0], CASES[6], CASES[7]):
        x, y = on_cuda(*make_case(case, seed=9))
        fused, ref = cuda_pair(name, pairs, **kw)
        assert_close_vg(lambda e, q: fused(e, y, ref_emb=q, ref_labels=y),
                        lambda e, q: ref(e, y, ref_emb=q, ref_labels=y), x, x * 1.0)
    assert op_calls


@pytest.mark.parametrize("name,kw", LOSSES[::2], ids=LOSS_IDS[::2])
def test_beside_an_indices_tuple(name, kw, op_calls):
    """the clean loss on a miner's tuple, the mixed term (the batch against itself, own rows
    excluded) from the refs op"""
    x, y = on_cuda(*make_case(CASES[1], seed=10))
    a, p, n = mo.miners.TripletMarginMiner(margin=0.3)(x, y)
    fused, ref = cuda_pair(name, "pos_neg", **kw)
    assert_close_vg(lambda e: fused(e, y, (a, p, n)), lambda e: ref(e, y, (a, p, n)), x)
    assert op_calls


@pytest.mark.parametrize("name,kw", LOSSES[::2], ids=LOSS_IDS[::2])
def test_detached_bank_asks_no_dr(name, kw, monkeypatch):
    """a detached memory bank: the backward ops are asked for dX only, which is the
    reference's; with the bank differentiable, for both"""
    asked = []
    for op in cmr.OPS:
        real = getattr(torch.ops.metrix_ops, f"{op}_bwd")

        def spy(*args, real=real):
            asked.append(args[-1])  # need_dr, every refs backward's last argument
            return real(*args)
        monkeypatch.setattr(torch.ops.metrix_ops, f"{op}_bwd", spy)
    x, y = make_case(CASES[0], seed=11)
    r, ry = refs_for(x, y, seed=12)
    x, y, r, ry = on_cuda(x, y, r, ry)
    fused, ref = cuda_pair(name, "pos_neg", **kw)
    assert_close_vg(lambda e: fused(e, y, ref_emb=r, ref_labels=ry),
                    lambda e: ref(e, y, ref_emb=r, ref_labels=ry), x)
    assert asked and not any(asked)
    asked.clear()
    check(name, "pos_neg", x, y, r, ry, **kw)
    assert asked and all(asked)


@pytest.mark.parametrize("name,kw", LOSSES[::2], ids=LOSS_IDS[::2])
def test_references_of_no_batch_class(name, kw, op_calls):
    """no anchor has a positive among the references (each mixes itself), and references
    of the anchors' one class only (no candidate: the term is 0)"""
    x, y = make_case(CASES[1], seed=13)
    g = torch.Generator().manual_seed(14)
    r = torch.randn(9, x.shape[1], dtype=x.dtype, generator=g)
    check(name, "pos_neg", *on_cuda(x, y, r, y.max() + 1 + torch.arange(9) % 3), **kw)
    one = torch.zeros(5, dtype=torch.long)
    check(name, "pos_neg", *on_cuda(x[:4], one[:4], r[:5], one), **kw)
    assert len(op_calls) == 2


@pytest.mark.parametrize("name,kw", LOSSES[::2], ids=LOSS_IDS[::2])
def test_empty_references_and_empty_batch_at_the_op(name, kw):
    """the ops on zero references (every anchor without a candidate) or zero anchors: the
    in-batch ops' empty outputs, zero gradients"""
    x = F.normalize(torch.randn(5, 4, dtype=torch.float64), dim=1).cuda().requires_grad_()
    y = torch.tensor([0, 0, 1, 2, 2]).cuda()
    r = torch.zeros(0, 4, dtype=torch.float64).cuda().requires_grad_()
    ry = torch.zeros(0, dtype=torch.long).cuda()
    own = torch.full((5,), -1).cuda()
    inp = mo.spec.LossInputs(x, y, None, r, ry, False, kw.get("distance", COS()))
    params = {**{"alpha": 2.0, "beta": 50.0, "base": 0.5, "m": 0.25, "gamma": 80.0,
                 "pos_margin": 0.0, "neg_margin": 1.0}, **kw}
    v = mr._fused_term(name, params, inp, "pos_neg", 0.35, x, r, own, "cuda")
    assert v.item() == 0.0
    dx, = torch.autograd.grad(v, x, allow_unused=True)
    assert dx is None or not dx.any()
    op = getattr(torch.ops.metrix_ops, f"{cmr.OPS[0]}_fwd")
    outs = op(x[:0], r, y[:0], ry, own[:0], 2.0, 50.0, 0.5, 0.35, False, 8)
    assert all(o.shape == (0,) for o in outs)


def test_float32_and_half(op_calls):
    x, y = make_case(CASES[1], seed=15)
    r, ry = refs_for(x, y, seed=16)
    x, y, r, ry = on_cuda(x, y, r, ry)
    for name, kw in LOSSES[::2]:
        fused, ref = cuda_pair(name, "pos_neg", **kw)
        rd = r.to(torch.bfloat16).double()  # the same values whatever e's dtype
        v64, (g64,) = value_and_grad(lambda e: ref(e, y, ref_emb=rd, ref_labels=ry), x)
        v32, (g32,) = value_and_grad(
            lambda e: fused(e.float(), y, ref_emb=rd.float(), ref_labels=ry), x)
        # Circle's γ amplifies fp32 rounding in the gradient's cancelling terms: tolerances
        # relative to the gradient's scale
        torch.testing.assert_close(v32.double(), v64, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(g32.double(), g64, rtol=1e-4,
                                   atol=1e-5 * float(g64.abs().max()))
        h = x.to(torch.bfloat16).requires_grad_()
        v = fused(h, y, ref_emb=rd.to(torch.bfloat16), ref_labels=ry)
        v.backward()
        assert v.dtype == torch.float32 and torch.isfinite(h.grad.float()).all()
    assert op_calls


@pytest.mark.parametrize("name,kw", LOSSES[::2], ids=LOSS_IDS[::2])
def test_under_fullgraph_compile_equals_eager(name, kw):
    torch._dynamo.reset()
    loss = getattr(mo.losses, name)(backend="cuda", metrix=mo.Metrix(lam=0.3), **kw)
    g = torch.Generator().manual_seed(17)
    x, r = torch.randn(13, 6, generator=g).cuda(), torch.randn(17, 6, generator=g).cuda()
    y = torch.randint(0, 4, (13,), generator=g).cuda()
    ry = torch.randint(0, 5, (17,), generator=g).cuda()
    compiled = torch.compile(lambda e, q: loss(e, y, ref_emb=q, ref_labels=ry), fullgraph=True,
                             backend="eager")
    assert_close_vg(compiled, lambda e, q: loss(e, y, ref_emb=q, ref_labels=ry), x, r,
                    rtol=1e-5, atol=1e-6)


def _op_args(dtype=torch.float64):
    g = torch.Generator().manual_seed(18)
    x = F.normalize(torch.randn(7, 4, dtype=dtype, generator=g), dim=1)
    r = F.normalize(torch.randn(9, 4, dtype=dtype, generator=g), dim=1)
    y = torch.sort(torch.randint(0, 3, (7,), generator=g)).values
    ry = torch.sort(torch.randint(0, 4, (9,), generator=g)).values
    own = torch.full((7,), -1, dtype=torch.long)
    if (ry == y[0]).any():
        own[0] = int((ry == y[0]).nonzero()[0])  # one own row
    return [t.cuda() for t in (x, r, y, ry, own)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    x, r, y, ry, own = _op_args(dtype)
    x, r = x.requires_grad_(), r.requires_grad_()
    ops = torch.ops.metrix_ops
    for anchor_neg in (False, True):
        tail = (0.3, anchor_neg, 4)
        torch.library.opcheck(ops.ms_metrix_mix_refs_fwd.default,
                              (x, r, y, ry, own, 2.0, 50.0, 0.5, *tail))
        torch.library.opcheck(ops.circle_metrix_mix_refs_fwd.default,
                              (x, r, y, ry, own, 0.25, 80.0, *tail))
        for cosine in (False, True):
            torch.library.opcheck(ops.lifted_metrix_mix_refs_fwd.default,
                                  (x, r, y, ry, own, cosine, 0.1, 0.8, *tail))
            torch.library.opcheck(ops.contrastive_metrix_mix_refs_fwd.default,
                                  (x, r, y, ry, own, cosine, 0.1, 0.8, *tail))


def test_bad_input_names_the_argument():
    x, r, y, ry, own = _op_args()
    op = torch.ops.metrix_ops.ms_metrix_mix_refs_fwd
    consts = (2.0, 50.0, 0.5)
    with pytest.raises(RuntimeError, match="ref_labels must be sorted"):
        op(x, r, y, ry.flip(0).contiguous(), own, *consts, 0.3, False, 8)
    with pytest.raises(RuntimeError, match="labels must be sorted"):
        op(x, r, y.flip(0).contiguous(), ry, own, *consts, 0.3, False, 8)
    bad = own.clone()
    bad[0] = int((ry != y[0]).nonzero()[0])  # a reference of another label
    with pytest.raises(RuntimeError, match="self: anchor 0"):
        op(x, r, y, ry, bad, *consts, 0.3, False, 8)
    with pytest.raises(RuntimeError, match="self must be int64"):
        op(x, r, y, ry, own[:3], *consts, 0.3, False, 8)
    with pytest.raises(RuntimeError, match="lam must be in"):
        op(x, r, y, ry, own, *consts, 1.5, False, 8)
    with pytest.raises(RuntimeError, match="same D"):
        op(x, r[:, :3].contiguous(), y, ry, own, *consts, 0.3, False, 8)
    with pytest.raises(RuntimeError, match="same dtype"):
        op(x, r.float(), y, ry, own, *consts, 0.3, False, 8)
    with pytest.raises(RuntimeError, match="chunk must be > 0"):
        op(x, r, y, ry, own, *consts, 0.3, False, 0)
    with pytest.raises(RuntimeError, match="one device"):
        op(x, r.cpu(), y, ry, own, *consts, 0.3, False, 8)
    with pytest.raises(RuntimeError, match="self must be on"):
        op(x, r, y, ry, own.cpu(), *consts, 0.3, False, 8)
