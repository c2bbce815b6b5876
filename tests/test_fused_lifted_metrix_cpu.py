"""GeneralizedLiftedStructureLoss with embedding-level Metrix (pos_neg, anchor_neg) on
backend="cpu": the clean op plus the fused Metrix op (per-anchor log-sum-exps of the
closed-form candidates), against the reference (dense B×B×B candidates): values and
gradients over the shared cases, λ at and inside [0, 1], both pair modes, L2 and cosine,
margins, blocks cut between classes and a class larger than a block; fp32 at every SIMD
level, half inputs; the op's checks, opcheck, torch.compile, and that the module really uses
the op. Helpers from test_fused_circle_metrix_cpu.py."""
import pytest
import torch
import torch.nn.functional as F

import metrix_ops as mo
from cases import CASE_IDS, CASES, assert_close_vg, make_case
from metrix_ops import _ext
from test_fused_circle_metrix_cpu import (LAM_PAIRS, assert_close_fp32, check_blocks, check_bwd_rejects,
                                          dense_clean_lses,
                                          check_compiles, check_half_inputs, check_op_rejects,
                                          check_simd_level, metrix_pair, spy)

pytestmark = pytest.mark.skipif(not _ext.HAS_EXT, reason="extension not built")

NAME = "GeneralizedLiftedStructureLoss"
# (distance, margins): PML's defaults (L2), margins on L2, the cosine similarity
KINDS = {"l2": (None, {}), "l2_margins": (None, {"pos_margin": 0.3, "neg_margin": 0.6}),
         "cosine": ("cos", {"pos_margin": 0.8, "neg_margin": 0.3})}


def pair(lam, pairs="pos_neg", kind="l2", weight=0.4, **kw):
    dist, margins = KINDS[kind]
    if dist == "cos":
        kw["distance"] = mo.distances.CosineSimilarity()
    cpu, _ = metrix_pair(NAME, lam, weight, pairs, **margins, **kw)
    if dist == "cos":  # a distance object per module
        kw["distance"] = mo.distances.CosineSimilarity()
    _, ref = metrix_pair(NAME, lam, weight, pairs, **margins, **kw)
    return cpu, ref


@pytest.fixture
def op_calls(monkeypatch):
    import metrix_ops.fused.generalized_lifted as fgl
    return spy(monkeypatch, fgl, "lifted_metrix_terms")


def lifted_logits(cosine, pm, nm):
    if cosine:
        return (lambda s: pm - s), (lambda s: s - nm)
    from metrix_ops.reference.metrix_soft_forms import loss_metric
    d = lambda s: loss_metric(s, mo.distances.LpDistance())  # noqa: E731
    return (lambda s: d(s) - pm), (lambda s: nm - d(s))


@pytest.mark.parametrize("kind", ["l2", "cosine"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("lam,pairs", LAM_PAIRS)
def test_matches_reference_fp64(case, lam, pairs, kind, op_calls):
    # "duplicates" has a negative duplicating its anchor: with anchor_neg, mix(a, n, λ) is a
    # itself, at rounding-noise distance, which both sides take as d = 0
    x, y = make_case(case)
    fused, ref = pair(lam, pairs, kind)
    assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x)
    assert op_calls


@pytest.mark.parametrize("kind", ["l2_margins", "cosine"])
@pytest.mark.parametrize("pairs", ["pos_neg", "anchor_neg"])
def test_margins_and_weight(kind, pairs, op_calls):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(29, 9, dtype=torch.float64, generator=g)
    y = torch.randint(0, 5, (29,), generator=g)
    fused, ref = pair(0.4, pairs, kind, weight=1.7)
    v = assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x)
    assert torch.isfinite(v) and v > 0
    assert op_calls


@pytest.mark.parametrize("kind", ["l2", "cosine"])
def test_fp32_matches_fp64_reference(kind):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(67, 24, generator=g)
    y = torch.randint(0, 9, (67,), generator=g)
    for lam, pairs in [(0.35, "pos_neg"), (0.7, "anchor_neg")]:
        fused, ref = pair(lam, pairs, kind)
        assert_close_fp32(lambda e: fused(e, y), lambda e: ref(e, y), x)


@pytest.mark.parametrize("simd", ["baseline", "avx2", "avx512"])
def test_fp32_simd_levels(simd, monkeypatch):
    """Every lane width of the fp32 kernels (the Newton square root included) against fp64."""
    check_simd_level(simd, monkeypatch, lambda lam, pairs: pair(lam, pairs, "l2_margins"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype):
    check_half_inputs(dtype, *pair(0.6))


@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("pairs", ["pos_neg", "anchor_neg"])
@pytest.mark.parametrize("block", [1, 4, 9, 1000])
def test_blocks_cut_between_classes(block, pairs, cosine):
    from metrix_ops.ops.lifted_metrix import lifted_metrix_lses
    pm, nm = (0.8, 0.3) if cosine else (0.1, 0.9)
    check_blocks(block, lambda u, y, lam, p, b: lifted_metrix_lses(u, y, cosine, pm, nm, lam,
                                                                   p, b),
                 *lifted_logits(cosine, pm, nm), pairs=pairs)


@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("block", [1, 4, 9, 1000])
def test_clean_terms_over_blocks(block, cosine):
    """the op's clean log-sum-exps (clean=True) from the blocks' rows and, off the diagonal,
    their columns, against the dense clean pairs (L2: a duplicated row at distance 0)"""
    from metrix_ops.ops.lifted_metrix import lifted_metrix_terms
    pm, nm = (0.8, 0.3) if cosine else (0.1, 0.9)
    check_blocks(block, lambda u, y, lam, p, b: lifted_metrix_terms(u, y, cosine, pm, nm, lam,
                                                                    p, b, clean=True)[2:],
                 *lifted_logits(cosine, pm, nm), dense=dense_clean_lses)


def test_module_uses_the_fused_op(op_calls, monkeypatch):
    import metrix_ops.fused.generalized_lifted as fgl
    x, y = torch.randn(12, 5), torch.randint(0, 3, (12,))
    mo.losses.GeneralizedLiftedStructureLoss(metrix=mo.Metrix(lam=0.5))(x, y)
    mo.losses.GeneralizedLiftedStructureLoss(metrix=mo.Metrix(lam=0.5, pairs="anchor_neg"),
                                             distance=mo.distances.CosineSimilarity())(x, y)
    assert len(op_calls) == 2, "backend='auto' did not take the fused Metrix op"
    # what it does not cover goes to the reference (auto)
    # against references too: both terms from one op's pass (test_metrix_refs_op.py checks
    # the values), and never the clean op
    loss = mo.losses.GeneralizedLiftedStructureLoss
    op_calls.clear()
    clean_ops = spy(monkeypatch, fgl, "gen_lifted_rows")
    clean_self = spy(monkeypatch, fgl, "gen_lifted_rows_self")
    loss(metrix=mo.Metrix(lam=0.5))(x, y, ref_emb=x.clone(), ref_labels=y)
    loss(metrix=mo.Metrix(lam=0.5))(x, y)
    assert len(op_calls) == 2 and not clean_ops and not clean_self
    op_calls.clear()
    loss(metrix=mo.Metrix(lam=0.5, pairs="pos_pos"))(x, y)
    loss(metrix=mo.Metrix(lam=0.5, pairs="neg_neg"))(x, y)
    loss(metrix=mo.Metrix(lam=0.5), distance=mo.distances.CosineSimilarity(p=1))(x, y)
    assert not op_calls


def test_drawn_lambda_is_the_reference_draw():
    x, y = torch.randn(15, 4, dtype=torch.float64), torch.randint(0, 4, (15,))
    cfg = mo.Metrix(alpha=2.0)
    torch.manual_seed(11)
    a = mo.losses.GeneralizedLiftedStructureLoss(backend="cpu", metrix=cfg)(x, y)
    torch.manual_seed(11)
    b = mo.losses.GeneralizedLiftedStructureLoss(backend="reference", metrix=cfg)(x, y)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_op_checks():
    ops = torch.ops.metrix_ops
    check_op_rejects(ops.lifted_metrix_self_fwd, (False, 0.0, 1.0))
    check_bwd_rejects(ops.lifted_metrix_self_fwd, ops.lifted_metrix_self_bwd, (False, 0.0, 1.0))


@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("anchor_neg", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype, anchor_neg, cosine):
    x = F.normalize(torch.randn(14, 5, dtype=dtype), dim=1).requires_grad_(True)
    y = torch.sort(torch.randint(0, 4, (14,))).values
    for clean in (False, True):
        torch.library.opcheck(torch.ops.metrix_ops.lifted_metrix_self_fwd.default,
                              (x, y, cosine, 0.1, 0.8, 0.3, anchor_neg, clean, 4))


def test_compiles_fullgraph():
    check_compiles(mo.losses.GeneralizedLiftedStructureLoss(backend="cpu",
                                                            metrix=mo.Metrix(lam=0.3)))
