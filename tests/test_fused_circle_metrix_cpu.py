"""CircleLoss with embedding-level Metrix (pos_neg, anchor_neg) on backend="cpu": the clean
op plus the fused Metrix op (per-anchor log-sum-exps of the closed-form candidates), against
the reference (dense B×B×B candidates): values and gradients over the shared cases, λ at and
inside [0, 1], both pair modes, γ large enough to overflow a naive exp, blocks cut between
classes and a class larger than a block; fp32 at every SIMD level, half inputs; the op's
checks, opcheck, torch.compile, and that the module really uses the op.

The helpers marked "shared" are imported by test_fused_lifted_metrix_cpu.py."""
import pytest
import torch
import torch.nn.functional as F

import metrix_ops as mo
from cases import CASE_IDS, CASES, assert_close_vg, make_case, value_and_grad
from metrix_ops import _ext

pytestmark = pytest.mark.skipif(not _ext.HAS_EXT, reason="extension not built")

# shared: λ at the ends and inside, both pair modes
LAM_PAIRS = [(lam, pairs) for pairs in ("pos_neg", "anchor_neg") for lam in (0.0, 0.3, 0.85, 1.0)]


def metrix_pair(name, lam, weight=0.4, pairs="pos_neg", **kw):
    """shared: (cpu module, reference module) of loss `name` with the same Metrix config."""
    cfg = mo.Metrix(level="embedding", pairs=pairs, lam=lam, weight=weight)
    mk = lambda b: getattr(mo.losses, name)(backend=b, metrix=cfg, **kw)  # noqa: E731
    return mk("cpu"), mk("reference")


def spy(monkeypatch, module, attr):
    """shared: a list that grows by one each time `module.attr` is called."""
    calls, real = [], getattr(module, attr)
    monkeypatch.setattr(module, attr, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def dense_lses(u, y, lam, pairs, pos_logit, neg_logit):
    """shared: per-anchor (lse⁺, lse⁻) of the reference's candidates, −inf without one."""
    from metrix_ops.reference.metrix import _in_batch_candidates
    from metrix_ops.reference.pairs import match_masks
    pos, neg = match_masks(y, y, True)
    s, _, member = _in_batch_candidates(u @ u.t(), u @ u.t(), pos, neg, lam, pairs)
    lse = lambda t: torch.logsumexp(torch.where(member, t, -torch.inf), 1)  # noqa: E731
    return lse(pos_logit(s)), lse(neg_logit(s))


def dense_clean_lses(u, y, lam, pairs, pos_logit, neg_logit):
    """shared: per-anchor (lse⁺, lse⁻) of the clean pairs (the self pair out), −inf for an
    empty side (λ and pairs play no part)."""
    from metrix_ops.reference.pairs import match_masks
    pos, neg = match_masks(y, y, True)
    s = u @ u.t()

    def lse(t, mask):  # a row without a pair: −inf, and no NaN in the gradient
        has = mask.any(1)
        v = torch.logsumexp(torch.where(mask & has[:, None], t, -torch.inf).where(
            has[:, None], 0.0), 1)
        return torch.where(has, v, -torch.inf)
    return lse(pos_logit(s), pos), lse(neg_logit(s), neg)


def check_blocks(block, lses_fn, pos_logit, neg_logit, pairs="pos_neg", dense=dense_lses):
    """shared: blocks of `block` rows rounded to whole classes (several blocks, a class of 7
    larger than a block, one block): both per-anchor outputs against the dense reference,
    values and gradients under unequal row weights; a singleton class and a duplicated row."""
    g = torch.Generator().manual_seed(block)
    x = torch.randn(37, 6, dtype=torch.float64, generator=g)
    y = torch.cat([torch.full((7,), 3), torch.randint(0, 8, (29,), generator=g),
                   torch.tensor([9])])
    x[8] = x[9]  # two rows of one class or two: a pair at distance 0
    perm = torch.randperm(37, generator=g)
    x, y = x[perm], y[perm]
    w1, w2 = (torch.rand(37, dtype=torch.float64, generator=g) for _ in range(2))
    lam = 0.45

    def total(lp, ln):
        return (torch.where(torch.isfinite(lp), lp, 0) * w1).sum() + \
            (torch.where(torch.isfinite(ln), ln, 0) * w2).sum()

    fused = lambda e: total(*lses_fn(F.normalize(e, dim=1), y, lam, pairs, block))  # noqa: E731
    ref = lambda e: total(*dense(F.normalize(e, dim=1), y, lam, pairs,  # noqa: E731
                                 pos_logit, neg_logit))
    assert_close_vg(fused, ref, x)


def check_compiles(loss):
    """shared: the module traces whole under torch.compile(fullgraph=True) and equals eager
    (in fp64: Circle's γ = 80 makes fp32 rounding differences of the traced graph visible)."""
    torch._dynamo.reset()
    compiled = torch.compile(lambda e, l: loss(e, l), fullgraph=True, dynamic=False)
    g = torch.Generator().manual_seed(3)
    for b, k in [(13, 4), (6, 6), (1, 1)]:  # random, no positives, no pairs at all
        x = torch.randn(b, 7, generator=g, dtype=torch.float64)
        y = torch.randint(0, k, (b,), generator=g)
        va, (ga,) = value_and_grad(lambda e: compiled(e, y), x)
        vb, (gb,) = value_and_grad(lambda e: loss(e, y), x)
        torch.testing.assert_close(va, vb, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(ga, gb, rtol=1e-9, atol=1e-12)
        assert b == 1 or vb > 0


def assert_close_fp32(fused, ref, x, scaled=False):
    """shared: an fp32 loss against the fp64 reference, rtol 1e-4 on the value and gradient;
    `scaled`: gradient entries to 1e-4 of the largest one (test_fused_circle_cpu.py's rule:
    Circle's γ = 80 turns fp32 cosines' rounding into ~γ·eps·|g| per entry, the clean op's too)."""
    if not scaled:
        assert_close_vg(lambda e: fused(e).double(), lambda e: ref(e.double()), x,
                        rtol=1e-4, atol=1e-6)
        return
    va, (ga,) = value_and_grad(lambda e: fused(e).double(), x)
    vb, (gb,) = value_and_grad(lambda e: ref(e.double()), x)
    torch.testing.assert_close(va, vb, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ga.double(), gb.double(), rtol=1e-4,
                               atol=1e-4 * float(gb.abs().max()))


def check_simd_level(simd, monkeypatch, make_pair, scaled=False):
    """shared: the fp32 kernels of one SIMD level against the fp64 reference."""
    monkeypatch.setenv("METRIX_OPS_SIMD", simd)
    try:
        torch.ops.metrix_ops._simd_level()
    except RuntimeError:
        pytest.skip(f"this CPU lacks {simd}")
    g = torch.Generator().manual_seed(7)
    x = torch.randn(45, 10, generator=g)  # 45: a tail of lanes on every width
    y = torch.randint(0, 6, (45,), generator=g)
    for lam, pairs in [(0.55, "pos_neg"), (0.3, "anchor_neg")]:
        fused, ref = make_pair(lam, pairs)
        assert_close_fp32(lambda e: fused(e, y), lambda e: ref(e, y), x, scaled)


def check_half_inputs(dtype, fused, ref):
    """shared: fp16/bf16 embeddings are computed in fp32, as the reference."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 16, generator=g).to(dtype)
    y = torch.randint(0, 6, (40,), generator=g)
    v = fused(x.requires_grad_(True), y)
    v.backward()
    assert v.dtype == torch.float32 and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    torch.testing.assert_close(v, ref(x.detach().float(), y), rtol=1e-4, atol=1e-5)


def check_op_rejects(op, tail):
    """shared: the forward op's input checks, `tail` its arguments after (x, labels) up to lam."""
    x = F.normalize(torch.randn(6, 3), dim=1)
    with pytest.raises(RuntimeError, match="labels must be sorted"):
        op(x, torch.tensor([0, 1, 0, 1, 2, 2]), *tail, 0.5, False, True, 64)
    with pytest.raises(RuntimeError, match="lam must be in"):
        op(x, torch.tensor([0, 0, 1, 1, 2, 2]), *tail, 1.5, False, True, 64)
    with pytest.raises(RuntimeError, match="labels must be int64"):
        op(x, torch.zeros(6, dtype=torch.int32), *tail, 0.5, False, True, 64)
    with pytest.raises(RuntimeError, match="x must be 2-D"):
        op(x[0], torch.zeros(6, dtype=torch.long), *tail, 0.5, False, True, 64)
    with pytest.raises(RuntimeError, match="block must be > 0"):
        op(x, torch.zeros(6, dtype=torch.long), *tail, 0.5, False, True, 0)


def check_bwd_rejects(fwd, bwd, tail):
    """shared: the backward op refuses per-anchor vectors of the wrong length (the mixed
    and the clean terms' gradients and log-sum-exps)."""
    x = F.normalize(torch.randn(6, 3, dtype=torch.float64), dim=1)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    lses = fwd(x, y, *tail, 0.5, False, True, 64)
    g, short = torch.ones(6, dtype=x.dtype), torch.ones(5, dtype=x.dtype)
    args = [g, g, g, g, x, y, *lses, *tail, 0.5, False, True, 64]
    assert bwd(*args).abs().sum() > 0  # the right lengths pass
    for k, name in [(0, "grad_pos"), (1, "grad_neg"), (2, "grad_clean_pos"),
                    (3, "grad_clean_neg"), (6, "lse_pos"), (7, "lse_neg"), (8, "clean_pos"),
                    (9, "clean_neg")]:
        bad = list(args)
        bad[k] = short
        with pytest.raises(RuntimeError, match=rf"{name} must be of shape \(6,\)"):
            bwd(*bad)


# ---- CircleLoss ----

def pair(lam, pairs="pos_neg", weight=0.4, **kw):
    return metrix_pair("CircleLoss", lam, weight, pairs, **kw)


@pytest.fixture
def op_calls(monkeypatch):
    import metrix_ops.fused.circle as fc
    return spy(monkeypatch, fc, "circle_metrix_terms")


def circle_logits(m=0.4, gamma=80.0):
    op, on, dp, dn = 1 + m, -m, 1 - m, m
    return (lambda s: -gamma * F.relu(op - s.detach()) * (s - dp),
            lambda s: gamma * F.relu(s.detach() - on) * (s - dn))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("lam,pairs", LAM_PAIRS)
def test_matches_reference_fp64(case, lam, pairs, op_calls):
    x, y = make_case(case)
    fused, ref = pair(lam, pairs)
    assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x)
    assert op_calls


@pytest.mark.parametrize("kw", [{"m": 0.25, "gamma": 256.0}, {"m": 0.6, "gamma": 10.0}])
@pytest.mark.parametrize("pairs", ["pos_neg", "anchor_neg"])
def test_hyper_parameters_and_weight(kw, pairs, op_calls):
    """γ = 256 puts exponents near ±1000: finite only through the log-sum-exp."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(29, 9, dtype=torch.float64, generator=g)
    y = torch.randint(0, 5, (29,), generator=g)
    fused, ref = pair(0.4, pairs, weight=1.7, **kw)
    v = assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x)
    assert torch.isfinite(v) and v > 0
    assert op_calls


def test_fp32_matches_fp64_reference():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(67, 24, generator=g)
    y = torch.randint(0, 9, (67,), generator=g)
    for lam, pairs in [(0.35, "pos_neg"), (0.7, "anchor_neg")]:
        fused, ref = pair(lam, pairs)
        assert_close_fp32(lambda e: fused(e, y), lambda e: ref(e, y), x, scaled=True)


@pytest.mark.parametrize("simd", ["baseline", "avx2", "avx512"])
def test_fp32_simd_levels(simd, monkeypatch):
    check_simd_level(simd, monkeypatch, lambda lam, pairs: pair(lam, pairs), scaled=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype):
    check_half_inputs(dtype, *pair(0.6))


@pytest.mark.parametrize("pairs", ["pos_neg", "anchor_neg"])
@pytest.mark.parametrize("block", [1, 4, 9, 1000])
def test_blocks_cut_between_classes(block, pairs):
    from metrix_ops.ops.circle_metrix import circle_metrix_lses
    check_blocks(block, lambda u, y, lam, p, b: circle_metrix_lses(u, y, 0.4, 80.0, lam, p, b),
                 *circle_logits(), pairs=pairs)


@pytest.mark.parametrize("block", [1, 4, 9, 1000])
def test_clean_terms_over_blocks(block):
    """the op's clean log-sum-exps (clean=True) from the blocks' rows and, off the diagonal,
    their columns, against the dense clean pairs; the mixed ones unchanged by them"""
    from metrix_ops.ops.circle_metrix import circle_metrix_terms
    check_blocks(block, lambda u, y, lam, p, b: circle_metrix_terms(u, y, 0.4, 80.0, lam, p, b,
                                                                    clean=True)[2:],
                 *circle_logits(), dense=dense_clean_lses)
    check_blocks(block, lambda u, y, lam, p, b: circle_metrix_terms(u, y, 0.4, 80.0, lam, p, b,
                                                                    clean=True)[:2],
                 *circle_logits())


def test_module_uses_the_fused_op(op_calls, monkeypatch):
    import metrix_ops.fused.circle as fc
    x, y = torch.randn(12, 5), torch.randint(0, 3, (12,))
    mo.losses.CircleLoss(metrix=mo.Metrix(lam=0.5))(x, y)
    mo.losses.CircleLoss(metrix=mo.Metrix(lam=0.5, pairs="anchor_neg"))(x, y)
    assert len(op_calls) == 2, "backend='auto' did not take the fused Metrix op"
    # what it does not cover goes to the reference (auto)
    # against references too: both terms from one op's pass (test_metrix_refs_op.py checks
    # the values), and never the clean op
    op_calls.clear()
    clean_ops = spy(monkeypatch, fc, "circle_rows")
    mo.losses.CircleLoss(metrix=mo.Metrix(lam=0.5))(x, y, ref_emb=x.clone(), ref_labels=y)
    mo.losses.CircleLoss(metrix=mo.Metrix(lam=0.5))(x, y)
    assert len(op_calls) == 2 and not clean_ops
    op_calls.clear()
    mo.losses.CircleLoss(metrix=mo.Metrix(lam=0.5, pairs="pos_pos"))(x, y)
    mo.losses.CircleLoss(metrix=mo.Metrix(lam=0.5, pairs="neg_neg"))(x, y)
    assert not op_calls


def test_drawn_lambda_is_the_reference_draw():
    x, y = torch.randn(15, 4, dtype=torch.float64), torch.randint(0, 4, (15,))
    cfg = mo.Metrix(alpha=2.0)
    torch.manual_seed(11)
    a = mo.losses.CircleLoss(backend="cpu", metrix=cfg)(x, y)
    torch.manual_seed(11)
    b = mo.losses.CircleLoss(backend="reference", metrix=cfg)(x, y)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_op_checks():
    from metrix_ops.ops.circle_metrix import circle_metrix_lses
    ops = torch.ops.metrix_ops
    check_op_rejects(ops.circle_metrix_self_fwd, (0.4, 80.0))
    check_bwd_rejects(ops.circle_metrix_self_fwd, ops.circle_metrix_self_bwd, (0.4, 80.0))
    with pytest.raises(ValueError, match="pairs must be"):
        circle_metrix_lses(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), 0.4, 80.0, 0.5,
                           pairs="pos_pos")


@pytest.mark.parametrize("anchor_neg", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype, anchor_neg):
    x = F.normalize(torch.randn(14, 5, dtype=dtype), dim=1).requires_grad_(True)
    y = torch.sort(torch.randint(0, 4, (14,))).values
    for clean in (False, True):
        torch.library.opcheck(torch.ops.metrix_ops.circle_metrix_self_fwd.default,
                              (x, y, 0.4, 80.0, 0.3, anchor_neg, clean, 4))


def test_compiles_fullgraph():
    check_compiles(mo.losses.CircleLoss(backend="cpu", metrix=mo.Metrix(lam=0.3)))
