"""ContrastiveLoss with embedding-level Metrix (pos_neg, anchor_neg) through the one fused CPU
op, against the reference (closed-form candidates over dense B×B×B tensors): values and
gradients over the shared cases, λ at and inside [0, 1], both distances, margins (the
paper's neg_margin=0.5), the clean loss's reducers, blocks cut between classes and a class
larger than a block; fp32, half inputs; the op's checks, opcheck, and that the module really
uses the op."""
import math

import pytest
import torch
import torch.nn.functional as F

import metrix_ops as mo
from cases import CASE_IDS, CASES, assert_close_vg, make_case
from metrix_ops import _ext

pytestmark = pytest.mark.skipif(not _ext.HAS_EXT, reason="extension not built")

LAM_PAIRS = [(0.0, "pos_neg"), (0.3, "pos_neg"), (0.85, "pos_neg"), (1.0, "pos_neg"),
             (0.3, "anchor_neg"), (1.0, "anchor_neg")]
# (distance, margins): PML's defaults, the Metrix paper's neg_margin, a positive margin, and
# the cosine similarity (positives want s ≥ pos_margin, negatives s ≤ neg_margin)
KINDS = {"l2": (None, {}), "l2_paper": (None, {"neg_margin": 0.5}),
         "l2_margins": (None, {"pos_margin": 0.3, "neg_margin": 1.2}),
         "cosine": ("cos", {"pos_margin": 0.6, "neg_margin": 0.2}),
         # squared L2 (fused/contrastive.op_form: the cosine ops at 1 − m/2, terms doubled)
         "l2sq": ("sq", {"neg_margin": 0.5}),
         "l2sq_margins": ("sq", {"pos_margin": 0.3, "neg_margin": 1.2})}


def pair(lam, weight=0.4, pairs="pos_neg", kind="l2", **kw):
    cfg = mo.Metrix(level="embedding", pairs=pairs, lam=lam, weight=weight)
    dist, margins = KINDS[kind]
    kw = {**margins, **kw}
    mk = lambda: {"cos": mo.distances.CosineSimilarity, "sq": lambda: mo.distances.LpDistance(  # noqa: E731
        power=2), None: lambda: None}[dist]()
    return (mo.losses.ContrastiveLoss(backend="cpu", metrix=cfg, distance=mk(), **kw),
            mo.losses.ContrastiveLoss(backend="reference", metrix=cfg, distance=mk(), **kw))


@pytest.fixture
def op_calls(monkeypatch):
    """How many times the module reached the fused Metrix op."""
    import metrix_ops.fused.contrastive as fc
    calls, real = [], fc.contrastive_metrix_rows
    monkeypatch.setattr(fc, "contrastive_metrix_rows",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("kind", ["l2", "l2_paper", "cosine", "l2sq"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("lam,pairs", LAM_PAIRS)
def test_matches_reference_fp64(case, lam, pairs, kind, op_calls):
    # "duplicates" has a negative duplicating its anchor: with anchor_neg, mix(a, n, λ) is a
    # itself, at rounding-noise distance; both sides take d = 0 there (no AvgNonZero term)
    x, y = make_case(case)
    fused, ref = pair(lam, pairs=pairs, kind=kind)
    assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x)
    assert op_calls


@pytest.mark.parametrize("kind", ["l2_margins", "cosine", "l2sq_margins"])
@pytest.mark.parametrize("reducer", [None, "MeanReducer", "SumReducer", "threshold"])
def test_margins_weight_and_clean_reducers(kind, reducer, op_calls):
    """The clean term takes the loss's reducer; the mixed one is AvgNonZero whatever it is."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(29, 9, dtype=torch.float64, generator=g)
    y = torch.randint(0, 5, (29,), generator=g)
    red = (None if reducer is None else mo.reducers.ThresholdReducer(low=0.05, high=0.9)
           if reducer == "threshold" else getattr(mo.reducers, reducer)())
    for pairs in ("pos_neg", "anchor_neg"):
        fused, ref = pair(0.4, weight=1.7, pairs=pairs, kind=kind, reducer=red)
        assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x)
    assert op_calls


@pytest.mark.parametrize("kind", ["l2_paper", "cosine", "l2sq"])
def test_fp32_matches_fp64_reference(kind):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(67, 24, generator=g)
    y = torch.randint(0, 9, (67,), generator=g)
    for lam, pairs in [(0.35, "pos_neg"), (0.7, "anchor_neg")]:
        fused, ref = pair(lam, pairs=pairs, kind=kind)
        assert_close_vg(lambda e: fused(e, y).double(), lambda e: ref(e.double(), y), x,
                        rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("simd", ["baseline", "avx2", "avx512"])
def test_fp32_simd_levels(simd, monkeypatch):
    """Every lane width of the fp32 kernels (the Newton square root included) against fp64."""
    monkeypatch.setenv("METRIX_OPS_SIMD", simd)
    try:
        torch.ops.metrix_ops._simd_level()
    except RuntimeError:
        pytest.skip(f"this CPU lacks {simd}")
    g = torch.Generator().manual_seed(7)
    x = torch.randn(45, 10, generator=g)  # 45: a tail of lanes on every width
    y = torch.randint(0, 6, (45,), generator=g)
    fused, ref = pair(0.55, kind="l2_paper")
    assert_close_vg(lambda e: fused(e, y).double(), lambda e: ref(e.double(), y), x,
                    rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 16, generator=g).to(dtype)
    y = torch.randint(0, 6, (40,), generator=g)
    fused, ref = pair(0.6, kind="l2_paper")
    v = fused(x.requires_grad_(True), y)
    v.backward()
    assert v.dtype == torch.float32 and torch.isfinite(x.grad).all()
    torch.testing.assert_close(v, ref(x.detach().float(), y), rtol=1e-4, atol=1e-5)


def _reference_rows(u, y, lam, pairs, cosine, pm, nm):
    """Per-anchor (pos_sum, pos_count, neg_sum, neg_count) of the mixed terms, dense."""
    from metrix_ops.reference.metrix import _in_batch_candidates
    from metrix_ops.reference.metrix_soft_forms import loss_metric
    from metrix_ops.reference.pairs import match_masks
    dist = mo.distances.CosineSimilarity() if cosine else mo.distances.LpDistance()
    pos, neg = match_masks(y, y, True)
    s, yy, member = _in_batch_candidates(u @ u.t(), u @ u.t(), pos, neg, lam, pairs)
    d = loss_metric(s, dist)
    tp = torch.where(member, yy * F.relu(dist.margin(d, pm)), 0)
    tn = torch.where(member, (1 - yy) * F.relu(dist.margin(nm, d)), 0)
    return tp.sum(1), (tp > 0).sum(1), tn.sum(1), (tn > 0).sum(1)


@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("block", [1, 4, 9, 1000])
def test_blocks_cut_between_classes(block, cosine):
    """Blocks of `block` rows rounded to whole classes: several blocks, a class larger than
    a block (it gets a block of its own), one block; every row output against the dense
    reference (counts exactly), unequal row weights on all four differentiable sums."""
    from metrix_ops.ops.contrastive import contrastive_rows_self
    from metrix_ops.ops.contrastive_metrix import contrastive_metrix_rows
    g = torch.Generator().manual_seed(block)
    x = torch.randn(37, 6, dtype=torch.float64, generator=g)
    y = torch.cat([torch.full((7,), 3), torch.randint(0, 8, (30,), generator=g)])[torch.randperm(37, generator=g)]
    w = [torch.rand(37, dtype=torch.float64, generator=g) for _ in range(4)]
    lam, (pm, nm) = 0.45, ((0.6, 0.2) if cosine else (0.1, 0.9))

    def fused(e):
        clean, mixed = contrastive_metrix_rows(F.normalize(e, dim=1), y, cosine, pm, nm, lam,
                                               block=block)
        return sum((t * wk).sum() for t, wk in zip(clean[0::2] + mixed[0::2], w))

    def ref(e):
        u = F.normalize(e, dim=1)
        clean = contrastive_rows_self(u, y, cosine, pm, nm)
        mixed = _reference_rows(u, y, lam, "pos_neg", cosine, pm, nm)
        return sum((t * wk).sum() for t, wk in zip(clean[0::2] + mixed[0::2], w))

    assert_close_vg(fused, ref, x)
    u = F.normalize(x, dim=1)
    clean, mixed = contrastive_metrix_rows(u, y, cosine, pm, nm, lam, block=block)
    expect = _reference_rows(u, y, lam, "pos_neg", cosine, pm, nm)
    assert torch.equal(mixed[1], expect[1]) and torch.equal(mixed[3], expect[3])
    clean_ref = contrastive_rows_self(u, y, cosine, pm, nm)
    assert torch.equal(clean[1], clean_ref[1]) and torch.equal(clean[3], clean_ref[3])


def test_module_uses_the_fused_op(op_calls):
    calls = op_calls
    # over 25 rows: at most 25 a side, auto takes the reference for ContrastiveLoss' L2
    # (driver.pml_exact_where_fused_rounds)
    x, y = torch.randn(30, 5), torch.randint(0, 3, (30,))
    mo.losses.ContrastiveLoss(metrix=mo.Metrix(lam=0.5))(x, y)
    mo.losses.ContrastiveLoss(metrix=mo.Metrix(lam=0.5, pairs="anchor_neg"),
                              distance=mo.distances.CosineSimilarity())(x, y)
    assert len(calls) == 2, "backend='auto' did not take the fused Metrix op"
    # what it does not cover goes to the reference (auto) or raises (cpu)
    calls.clear()
    mo.losses.ContrastiveLoss(metrix=mo.Metrix(lam=0.5, pairs="pos_pos"))(x, y)
    mo.losses.ContrastiveLoss(metrix=mo.Metrix(lam=0.5, pairs="neg_neg"))(x, y)
    mo.losses.ContrastiveLoss(metrix=mo.Metrix(lam=0.5))(x, y, ref_emb=x.clone(), ref_labels=y)
    assert not calls
    with pytest.raises(NotImplementedError, match="backend='cpu'"):
        mo.losses.ContrastiveLoss(backend="cpu", metrix=mo.Metrix(lam=0.5),
                                  distance=mo.distances.LpDistance(p=1))(x, y)


def test_drawn_lambda_is_the_reference_draw():
    """λ drawn per call (no fixed λ): the same draw reaches both backends."""
    x, y = torch.randn(15, 4, dtype=torch.float64), torch.randint(0, 4, (15,))
    cfg = mo.Metrix(alpha=2.0)
    torch.manual_seed(11)
    a = mo.losses.ContrastiveLoss(backend="cpu", metrix=cfg, neg_margin=0.5)(x, y)
    torch.manual_seed(11)
    b = mo.losses.ContrastiveLoss(backend="reference", metrix=cfg, neg_margin=0.5)(x, y)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def _fwd_args(x, y, lam=0.5, anchor_neg=False, cosine=False):
    return (x, y, cosine, 0.0, 1.0, 0.0, math.inf, lam, anchor_neg, 64)


def test_op_rejects_unsorted_labels_bad_lambda_and_pairs():
    from metrix_ops.ops.contrastive_metrix import contrastive_metrix_rows
    x = F.normalize(torch.randn(6, 3), dim=1)
    op = torch.ops.metrix_ops.contrastive_metrix_self_fwd
    with pytest.raises(RuntimeError, match="labels must be sorted"):
        op(*_fwd_args(x, torch.tensor([0, 1, 0, 1, 2, 2])))
    with pytest.raises(RuntimeError, match="lam must be in"):
        op(*_fwd_args(x, torch.tensor([0, 0, 1, 1, 2, 2]), lam=1.5))
    with pytest.raises(RuntimeError, match="labels must be int64"):
        op(*_fwd_args(x, torch.zeros(6, dtype=torch.int32)))
    with pytest.raises(RuntimeError, match="x must be 2-D"):
        op(*_fwd_args(x[0], torch.zeros(6, dtype=torch.long)))
    with pytest.raises(ValueError, match="pairs must be"):
        contrastive_metrix_rows(x, torch.zeros(6, dtype=torch.long), False, 0.0, 1.0, 0.5,
                                pairs="pos_pos")
    with pytest.raises(ValueError, match="lam must be in"):
        mo.losses.ContrastiveLoss(backend="cpu", metrix=mo.Metrix())(x, torch.arange(6), lam=2.0)


@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("anchor_neg", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype, anchor_neg, cosine):
    x = F.normalize(torch.randn(14, 5, dtype=dtype), dim=1).requires_grad_(True)
    y = torch.sort(torch.randint(0, 4, (14,))).values
    torch.library.opcheck(torch.ops.metrix_ops.contrastive_metrix_self_fwd.default,
                          (x, y, cosine, 0.1, 0.8, 0.0, math.inf, 0.3, anchor_neg, 4))


def test_backward_op_checks_its_row_vectors():
    """A direct call with a row vector of the wrong length is refused, not read past its end."""
    x = F.normalize(torch.randn(6, 3, dtype=torch.float64), dim=1)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    g, short = torch.ones(6, dtype=x.dtype), torch.ones(5, dtype=x.dtype)
    args = [g, g, g, g, x, y, False, 0.0, 1.0, 0.0, math.inf, 0.5, False, 64]
    torch.ops.metrix_ops.contrastive_metrix_self_bwd(*args)  # the right lengths pass
    for k, name in [(0, "grad_pos"), (1, "grad_neg"), (2, "grad_mix_pos"), (3, "grad_mix_neg")]:
        bad = list(args)
        bad[k] = short
        with pytest.raises(RuntimeError, match=rf"{name} must be of shape \(6,\)"):
            torch.ops.metrix_ops.contrastive_metrix_self_bwd(*bad)
