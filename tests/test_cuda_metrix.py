"""backend="cuda" for MultiSimilarityLoss, ContrastiveLoss, CircleLoss and
GeneralizedLiftedStructureLoss with embedding-level Metrix (pos_neg, anchor_neg;
csrc/cuda/ms_metrix_cuda.cu, contrastive_metrix_cuda.cu and lse_metrix_cuda.cu on
cuda/metrix_rows.cuh, beside the CUDA engine's clean ops) against the reference
(closed-form candidates over dense B×B×B tensors) and the CPU engine: values and gradients
over the shared cases, λ at and inside [0, 1], chunks cut between classes, a class larger
than a chunk and than the Triton engine's limit of 64; fullgraph compile; opcheck; bad
input; that the module uses the op. Skipped without a GPU and the compiled CUDA kernels."""
import pytest
import torch
import torch.nn.functional as F

import metrix_ops as mo
from cases import CASE_IDS, CASES, assert_close_vg, make_case, value_and_grad
from metrix_ops import _ext
from metrix_ops.distances import CosineSimilarity

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and _ext.HAS_CUDA_EXT),
                                reason="needs a CUDA device and the compiled CUDA kernels")


@pytest.fixture(autouse=True)
def _fp32_products(no_tf32):  # conftest.py
    pass


LOSSES = [("MultiSimilarityLoss", {}), ("ContrastiveLoss", {}),
          ("ContrastiveLoss", {"distance": "cosine", "pos_margin": 0.9, "neg_margin": 0.4}),
          ("ContrastiveLoss", {"pos_margin": 0.1, "neg_margin": 0.8,
                               "reducer": mo.reducers.MeanReducer()}),
          ("CircleLoss", {}), ("CircleLoss", {"m": 0.4, "gamma": 32.0}),
          ("GeneralizedLiftedStructureLoss", {}),
          ("GeneralizedLiftedStructureLoss", {"distance": "cosine", "pos_margin": 0.9,
                                              "neg_margin": 0.2})]
LOSS_IDS = ["ms", "con", "con_cos", "con_mean", "circle", "circle_kw", "gen_lifted",
            "gen_lifted_cos"]


def make(backend, lam, weight=0.4, pairs="pos_neg", name="MultiSimilarityLoss", **kw):
    cfg = mo.Metrix(level="embedding", pairs=pairs, lam=lam, weight=weight)
    if kw.get("distance") == "cosine":
        kw = dict(kw, distance=CosineSimilarity())
    return getattr(mo.losses, name)(backend=backend, metrix=cfg, **kw)


@pytest.fixture
def op_calls(monkeypatch):
    """How many times the module reached a CUDA Metrix op."""
    import metrix_ops.fused.cuda_metrix as cm
    calls = []
    for fn in ("ms_metrix_rows_cuda", "con_metrix_rows_cuda", "lse_metrix_rows_cuda"):
        real = getattr(cm, fn)
        monkeypatch.setattr(cm, fn, lambda *a, real=real, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("lam,pairs", [(0.0, "pos_neg"), (0.3, "pos_neg"), (0.85, "pos_neg"),
                                       (1.0, "pos_neg"), (0.3, "anchor_neg"), (1.0, "anchor_neg")])
@pytest.mark.parametrize("name,kw", LOSSES, ids=LOSS_IDS)
def test_matches_reference_fp64(case, lam, pairs, name, kw, op_calls):
    x, y = make_case(case)
    x, y = x.detach().cuda(), y.cuda()
    fused = make("cuda", lam, pairs=pairs, name=name, **kw)
    ref = make("reference", lam, pairs=pairs, name=name, **kw)
    assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x)
    # Circle's mixed term is 0 at λ = 0 or 1 (one side has no label mass): no op call then
    assert op_calls or (name == "CircleLoss" and lam in (0.0, 1.0))


@pytest.mark.parametrize("kw", [{"alpha": 1.3, "beta": 20.0, "base": 0.3},
                                {"alpha": 4.0, "beta": 80.0, "base": 0.7}])
def test_hyper_parameters_and_weight(kw):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(29, 9, dtype=torch.float64, generator=g).cuda()
    y = torch.randint(0, 5, (29,), generator=g).cuda()
    fused, ref = make("cuda", 0.4, weight=1.7, **kw), make("reference", 0.4, weight=1.7, **kw)
    assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x)


@pytest.mark.parametrize("name,kw", LOSSES, ids=LOSS_IDS)
def test_fp32_and_bf16(name, kw):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(67, 24, generator=g).cuda()
    y = torch.randint(0, 9, (67,), generator=g).cuda()
    fused, ref = make("cuda", 0.35, name=name, **kw), make("reference", 0.35, name=name, **kw)
    va, (ga,) = value_and_grad(lambda e: fused(e, y).double(), x)
    vb, (gb,) = value_and_grad(lambda e: ref(e.double(), y), x)
    torch.testing.assert_close(va, vb, rtol=1e-4, atol=1e-6)
    # Circle's γ turns fp32 cosines' rounding into ~γ·eps·|g| per gradient entry (the CPU
    # tests' rule): entries to 1e-4 of the largest
    atol = 1e-4 * float(gb.abs().max()) if name == "CircleLoss" else 1e-6
    torch.testing.assert_close(ga.double(), gb.double(), rtol=1e-4, atol=atol)
    xb = x.bfloat16().requires_grad_(True)
    out = fused(xb, y)
    out.backward()
    assert out.dtype == torch.float32 and torch.isfinite(xb.grad.float()).all()


@pytest.mark.parametrize("name,kw", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("pairs", ["pos_neg", "anchor_neg"])
@pytest.mark.parametrize("chunk", [1, 10, 4096])
def test_chunks_and_large_classes_equal_the_cpu_engine(pairs, chunk, name, kw, monkeypatch):
    """Chunks of whole classes (1: every class its own chunk; 10: classes straddling the
    target), classes of 70 and 3 rows and singletons, against the CPU engine in fp64."""
    import metrix_ops.fused.cuda_metrix as cm
    monkeypatch.setattr(cm, "CHUNK", chunk)
    g = torch.Generator().manual_seed(chunk)
    y = torch.cat([torch.zeros(70, dtype=torch.long), torch.randint(1, 12, (60,), generator=g),
                   torch.arange(100, 104)])[torch.randperm(134, generator=g)]
    x = torch.randn(134, 16, dtype=torch.float64, generator=g)
    fused = make("cuda", 0.6, pairs=pairs, name=name, **kw)
    cpu = make("cpu", 0.6, pairs=pairs, name=name, **kw)
    assert_close_vg(lambda e: fused(e, y.cuda()), lambda e: cpu(e.cpu(), y).cuda(), x.cuda())


@pytest.mark.parametrize("name,kw", LOSSES[::2], ids=LOSS_IDS[::2])
def test_under_fullgraph_compile_equals_eager(name, kw):
    """the module with Metrix on the CUDA engine traces whole (the sort, the class layout,
    the clean and Metrix ops, the finishing), values and gradient as eager"""
    torch._dynamo.reset()
    loss = make("cuda", 0.3, name=name, **kw)
    g = torch.Generator().manual_seed(21)
    x = torch.randn(23, 6, generator=g).cuda()
    y = torch.randint(0, 5, (23,), generator=g).cuda()
    compiled = torch.compile(lambda e: loss(e, y), fullgraph=True, backend="eager")
    assert_close_vg(compiled, lambda e: loss(e, y), x, rtol=1e-5, atol=1e-6)


def test_opcheck():
    from metrix_ops.fused.cuda_metrix import class_layout
    y = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3], device="cuda")
    x = F.normalize(torch.randn(8, 5, dtype=torch.float64, device="cuda"), dim=1)
    start, size = class_layout(y)
    x.requires_grad_(True)
    for anchor_neg in (False, True):
        torch.library.opcheck(torch.ops.metrix_ops.ms_metrix_mix_fwd.default,
                              (x, y, start, size, 2.0, 50.0, 0.5, 0.3, anchor_neg, 4))
        for cosine in (False, True):
            torch.library.opcheck(torch.ops.metrix_ops.contrastive_metrix_mix_fwd.default,
                                  (x, y, start, size, cosine, 0.1, 0.8, 0.3, anchor_neg, 4))
            torch.library.opcheck(torch.ops.metrix_ops.lifted_metrix_mix_fwd.default,
                                  (x, y, start, size, cosine, 0.1, 0.8, 0.3, anchor_neg, 4))
        torch.library.opcheck(torch.ops.metrix_ops.circle_metrix_mix_fwd.default,
                              (x, y, start, size, 0.25, 80.0, 0.3, anchor_neg, 4))


def test_bad_input_names_the_argument():
    from metrix_ops.fused.cuda_metrix import class_layout
    y = torch.tensor([0, 0, 1, 1, 2], device="cuda")
    x = F.normalize(torch.randn(5, 4, device="cuda"), dim=1)
    start, size = class_layout(y)
    op = torch.ops.metrix_ops.ms_metrix_mix_fwd
    with pytest.raises(RuntimeError, match="lam must be in"):
        op(x, y, start, size, 2.0, 50.0, 0.5, 1.5, False, 8)
    with pytest.raises(RuntimeError, match="class_size"):
        op(x, y, start, size[:3], 2.0, 50.0, 0.5, 0.5, False, 8)
    with pytest.raises(RuntimeError, match="label-sorted"):
        op(x, y, start.flip(0).contiguous(), size, 2.0, 50.0, 0.5, 0.5, False, 8)
    bad = size.clone()
    bad[1] = 3  # a row inside a class disagreeing with its class's first row
    with pytest.raises(RuntimeError, match="label-sorted"):
        op(x, y, start, bad, 2.0, 50.0, 0.5, 0.5, False, 8)
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        op(x.cpu(), y, start, size, 2.0, 50.0, 0.5, 0.5, False, 8)
    with pytest.raises(RuntimeError, match="lam must be in"):
        torch.ops.metrix_ops.contrastive_metrix_mix_fwd(x, y, start, size, False, 0.0, 1.0, -0.1,
                                                        False, 8)
