"""Embedding-level Metrix on the Triton engine (MultiSimilarityLoss; ContrastiveLoss and
GeneralizedLiftedStructureLoss with L2 and cosine distances; CircleLoss) against the reference (closed-form candidates over dense B×B×B
tensors): values and gradients over the shared cases, λ at and inside [0, 1], pos_neg and
anchor_neg, chunks packing several classes, a class filling a chunk of 32 and of 64 rows,
several column tiles; the mixed rows alone with unequal weights; fp32 and half inputs; what
is not covered; opcheck; sm_90 compilation.

Without a GPU these run under TRITON_INTERPRET=1 on CPU tensors."""
import math

import pytest
import torch
import torch.nn.functional as F

import metrix_ops as mo
from cases import CASE_IDS, CASES, assert_close_vg, make_case
from triton_cases import DEVICE, compiles_only, on_dev, requires_triton, run_sm90_script

pytestmark = requires_triton


# loss id -> (class name, hyper-parameter variants, the module and function of its Triton
# Metrix rows)
LOSSES = {
    "ms": ("MultiSimilarityLoss", [{}, {"alpha": 1.3, "beta": 20.0, "base": 0.3}],
           "ms_metrix", "ms_metrix_rows_triton"),
    "con_l2": ("ContrastiveLoss", [{}, {"pos_margin": 0.2, "neg_margin": 0.9}],
               "contrastive_metrix", "contrastive_metrix_rows_triton"),
    "con_cos": ("ContrastiveLoss",
                [{"distance": mo.distances.CosineSimilarity(), "pos_margin": 0.9,
                  "neg_margin": 0.1},
                 {"distance": mo.distances.CosineSimilarity(), "pos_margin": 0.6,
                  "neg_margin": 0.3}],
                "contrastive_metrix", "contrastive_metrix_rows_triton"),
    "circle": ("CircleLoss", [{}, {"m": 0.25, "gamma": 256.0}], "circle_metrix",
               "circle_metrix_lses_triton"),
    "gl_l2": ("GeneralizedLiftedStructureLoss", [{}, {"pos_margin": 0.2, "neg_margin": 0.8}],
              "generalized_lifted_metrix", "lifted_metrix_lses_triton"),
    "gl_cos": ("GeneralizedLiftedStructureLoss",
               [{"distance": mo.distances.CosineSimilarity(), "pos_margin": 0.9,
                 "neg_margin": 0.1},
                {"distance": mo.distances.CosineSimilarity(), "pos_margin": 0.6,
                 "neg_margin": 0.3}],
               "generalized_lifted_metrix", "lifted_metrix_lses_triton"),
}


def pair(loss, lam, weight=0.4, pairs="pos_neg", variant=0):
    name, variants = LOSSES[loss][:2]
    cfg = mo.Metrix(level="embedding", pairs=pairs, lam=lam, weight=weight)
    kw = variants[variant]
    return (getattr(mo.losses, name)(backend="triton", metrix=cfg, **kw),
            getattr(mo.losses, name)(backend="reference", metrix=cfg, **kw))


@pytest.fixture(params=list(LOSSES))
def loss(request):
    return request.param


@pytest.fixture
def op_calls(monkeypatch, loss):
    """How many times the module reached the loss's Triton Metrix op."""
    import importlib
    mod = importlib.import_module("metrix_ops.triton." + LOSSES[loss][2])
    fn = LOSSES[loss][3]
    calls, real = [], getattr(mod, fn)
    monkeypatch.setattr(mod, fn, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("lam,pairs", [(0.0, "pos_neg"), (0.3, "pos_neg"), (1.0, "pos_neg"),
                                       (0.7, "anchor_neg")])
def test_matches_reference_fp64(loss, case, lam, pairs, op_calls):
    x, y = on_dev(*make_case(case))
    tri, ref = pair(loss, lam, pairs=pairs)
    assert_close_vg(lambda e: tri(e, y), lambda e: ref(e, y), x)
    # Circle's mixed term is 0 at λ ∈ {0, 1} (a side without label mass): no launch
    assert bool(op_calls) != (loss == "circle" and lam in (0.0, 1.0))


def _labels(sizes, g):
    """Labels with the given class sizes, shuffled (the op sorts them)."""
    y = torch.cat([torch.full((n,), k) for k, n in enumerate(sizes)])
    return y[torch.randperm(len(y), generator=g)]


# chunk packing (classes of 1..8 rows, several per chunk of 16), a class of 17 (chunks of
# 32), a class of 64 (chunks of 64), and enough rows for several column tiles
@pytest.mark.parametrize("sizes", [[3, 1, 8, 5, 2, 7, 4, 1, 6], [17, 2, 9, 1],
                                   [64, 3, 5], [2] * 30])
@pytest.mark.parametrize("lam", [0.45, 0.9])
def test_chunks_and_tiles_fp64(loss, sizes, lam, op_calls):
    g = torch.Generator().manual_seed(sum(sizes) + int(10 * lam))
    y = _labels(sizes, g)
    x = torch.randn(len(y), 11, dtype=torch.float64, generator=g)
    x, y = on_dev(x, y)
    tri, ref = pair(loss, lam, weight=1.3, variant=1)
    assert_close_vg(lambda e: tri(e, y), lambda e: ref(e, y), x)
    assert op_calls


def _ref_mix_rows(u, y, lam, pairs, alpha=2.0, beta=50.0, base=0.5):
    """ℓ̃(a) per anchor from the reference's dense candidates."""
    from metrix_ops.reference.metrix import _in_batch_candidates
    from metrix_ops.reference.pairs import match_masks
    pos, neg = match_masks(y, y, True)
    s, _, member = _in_batch_candidates(u @ u.t(), u @ u.t(), pos, neg, lam, pairs)
    zero = torch.zeros(len(u), 1, dtype=u.dtype, device=u.device)

    def side(arg, weight):  # (1/k) log(1 + y Σ e^arg), y the side's label weight
        if weight == 0:
            return zero[:, 0]
        return torch.logsumexp(torch.cat([zero, torch.where(member, arg + math.log(weight),
                                                            -torch.inf)], 1), 1)
    return side(-alpha * (s - base), lam) / alpha + side(beta * (s - base), 1 - lam) / beta


@pytest.mark.parametrize("lam,pairs", [(0.35, "pos_neg"), (0.6, "anchor_neg"), (1.0, "pos_neg")])
def test_mixed_rows_with_unequal_weights(lam, pairs):
    """The op's rows weighted unequally: each anchor's upstream gradient, through both
    gradient kernels (the chunk rows and the column owners)."""
    from metrix_ops.triton.ms_metrix import ms_metrix_rows_triton
    g = torch.Generator().manual_seed(int(100 * lam))
    y = _labels([4, 1, 6, 3, 9, 2, 5], g)
    x = torch.randn(len(y), 6, dtype=torch.float64, generator=g)
    w = torch.randn(len(y), dtype=torch.float64, generator=g)
    x, y, w = on_dev(x, y, w)
    assert_close_vg(
        lambda e: (ms_metrix_rows_triton(F.normalize(e, dim=1), y, 2.0, 50.0, 0.5, lam, pairs) * w).sum(),
        lambda e: (_ref_mix_rows(F.normalize(e, dim=1), y, lam, pairs) * w).sum(), x)


def _ref_con_rows(u, y, lam, pairs, cosine, pos_m, neg_m):
    """Per anchor (pos_sum, pos_count, neg_sum, neg_count) of the mixed contrastive terms from
    the reference's dense candidates; d̃ = 0 (no slope) where 2 − 2s̃ < 16 eps."""
    from metrix_ops.reference.metrix import _in_batch_candidates
    from metrix_ops.reference.pairs import match_masks
    pos, neg = match_masks(y, y, True)
    s, _, member = _in_batch_candidates(u @ u.t(), u @ u.t(), pos, neg, lam, pairs)
    if cosine:
        vp, vn = pos_m - s, s - neg_m
    else:
        q = (2 - 2 * s).clamp_min(0)
        far = q >= 16 * torch.finfo(u.dtype).eps
        d = torch.where(far, torch.where(far, q, 1.0).sqrt(), 0.0)
        vp, vn = d - pos_m, neg_m - d
    tp = torch.where(member, lam * vp.clamp_min(0), 0.0)
    tn = torch.where(member, (1 - lam) * vn.clamp_min(0), 0.0)
    return tp.sum(1), (tp > 0).sum(1), tn.sum(1), (tn > 0).sum(1)


@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("lam,pairs", [(0.35, "pos_neg"), (0.6, "anchor_neg")])
def test_contrastive_mixed_rows_with_unequal_weights(cosine, lam, pairs):
    """The contrastive op's four rows: counts equal, the two sums weighted unequally (each
    anchor's two upstream gradients), values and gradients."""
    from metrix_ops.triton.contrastive_metrix import contrastive_metrix_rows_triton
    g = torch.Generator().manual_seed(int(100 * lam) + cosine)
    y = _labels([4, 1, 6, 3, 9, 2, 5], g)
    x = torch.randn(len(y), 6, dtype=torch.float64, generator=g)
    w1, w2 = (torch.randn(len(y), dtype=torch.float64, generator=g) for _ in range(2))
    x, y, w1, w2 = on_dev(x, y, w1, w2)
    pm, nm = (0.8, 0.2) if cosine else (0.3, 1.1)
    got = contrastive_metrix_rows_triton(F.normalize(x, dim=1), y, cosine, pm, nm, lam, pairs)
    want = _ref_con_rows(F.normalize(x, dim=1), y, lam, pairs, cosine, pm, nm)
    assert torch.equal(got[1].long(), want[1]) and torch.equal(got[3].long(), want[3])
    assert int(want[1].sum()) > 0 and int(want[3].sum()) > 0  # both sides have kept terms

    def weighted(rows):
        return (rows[0] * w1).sum() + (rows[2] * w2).sum()
    assert_close_vg(
        lambda e: weighted(contrastive_metrix_rows_triton(F.normalize(e, dim=1), y, cosine, pm,
                                                          nm, lam, pairs)),
        lambda e: weighted(_ref_con_rows(F.normalize(e, dim=1), y, lam, pairs, cosine, pm, nm)),
        x)


def _ref_lifted_sides(u, y, lam, pairs, cosine, pos_m, neg_m):
    """Per anchor (lse⁺, lse⁻) of the mixed lifted exponents from the reference's dense
    candidates, −inf without one; d̃ = 0 where 2 − 2s̃ < 16 eps (as _ref_con_rows)."""
    from metrix_ops.reference.metrix import _in_batch_candidates
    from metrix_ops.reference.pairs import match_masks
    pos, neg = match_masks(y, y, True)
    s, _, member = _in_batch_candidates(u @ u.t(), u @ u.t(), pos, neg, lam, pairs)
    if cosine:
        xp, xn = pos_m - s, s - neg_m
    else:
        q = (2 - 2 * s).clamp_min(0)
        far = q >= 16 * torch.finfo(u.dtype).eps
        d = torch.where(far, torch.where(far, q, 1.0).sqrt(), 0.0)
        xp, xn = d - pos_m, neg_m - d
    return (torch.logsumexp(torch.where(member, xp, -torch.inf), 1),
            torch.logsumexp(torch.where(member, xn, -torch.inf), 1))


@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("lam,pairs", [(0.35, "pos_neg"), (0.6, "anchor_neg"), (0.0, "pos_neg"),
                                       (1.0, "pos_neg")])
def test_lifted_mixed_sides_with_unequal_weights(cosine, lam, pairs):
    """GeneralizedLifted's op: z (the sides with label mass; λ = 0 or 1 switches one off in
    the kernel) weighted unequally per anchor, values and gradients, and its candidate mask."""
    from metrix_ops.triton.generalized_lifted_metrix import lifted_metrix_lses_triton
    g = torch.Generator().manual_seed(int(100 * lam) + cosine)
    y = _labels([4, 1, 6, 3, 9, 2, 5], g)
    x = torch.randn(len(y), 6, dtype=torch.float64, generator=g)
    w = torch.randn(len(y), dtype=torch.float64, generator=g)
    x, y, w = on_dev(x, y, w)
    pm, nm = (0.8, 0.2) if cosine else (0.3, 1.1)

    def ref_z(e):
        lp, ln = _ref_lifted_sides(F.normalize(e, dim=1), y, lam, pairs, cosine, pm, nm)
        has = torch.isfinite(lp)
        z = torch.zeros_like(lp)
        if lam > 0:
            z = z + torch.where(has, lp, 0.0)
        if lam < 1:
            z = z + torch.where(has, ln, 0.0)
        return z, has

    z, has = lifted_metrix_lses_triton(F.normalize(x, dim=1), y, cosine, pm, nm, lam, pairs)
    assert torch.equal(has, ref_z(x)[1]) and bool(has.any())
    assert_close_vg(
        lambda e: (lifted_metrix_lses_triton(F.normalize(e, dim=1), y, cosine, pm, nm, lam,
                                             pairs)[0] * w).sum(),
        lambda e: (ref_z(e)[0] * w).sum(), x)


def test_contrastive_duplicates_have_no_slope():
    """A positive duplicated (mix of the anchor's twin): the candidate at d̃ ≈ 0 counts as
    d̃ = 0 with no gradient, as the reference; gradients stay finite."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(12, 4, dtype=torch.float64, generator=g)
    y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4])
    x[1] = x[0]
    x[4] = x[3]
    x, y = on_dev(x, y)
    tri, ref = pair("con_l2", 1.0)  # λ = 1: the candidates are the positives themselves
    assert_close_vg(lambda e: tri(e, y), lambda e: ref(e, y), x)


def test_fp32_matches_fp64_reference(loss):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(67, 24, generator=g)
    y = torch.randint(0, 9, (67,), generator=g)
    x, y = on_dev(x, y)
    tri, ref = pair(loss, 0.35)
    # atol: the gradients reach 0.8 (Circle's γ = 80), and fp32 rounding of the normalisation
    # and the tiles leaves ~1.2e-6 on them (1.5e-6 of the largest, ~25 ulp)
    assert_close_vg(lambda e: tri(e, y).double(), lambda e: ref(e.double(), y), x,
                    rtol=1e-4, atol=3e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(loss, dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 16, generator=g).to(dtype)
    y = torch.randint(0, 6, (40,), generator=g)
    x, y = on_dev(x, y)
    tri, ref = pair(loss, 0.6)
    x.requires_grad_(True)
    v = tri(x, y)
    v.backward()
    assert v.dtype == torch.float32 and torch.isfinite(x.grad).all()
    torch.testing.assert_close(v, ref(x.detach().float(), y), rtol=1e-4, atol=1e-5)


def test_not_covered_calls_match_reference(loss, op_calls):
    """pos_pos pairs, a separate ref_emb: the Triton op is not used (the clean term stays on
    Triton, the mixed one is the reference's), values still equal."""
    x2, y2 = on_dev(*make_case(CASES[1]))
    tri, ref = pair(loss, 0.4, pairs="pos_pos")
    assert_close_vg(lambda e: tri(e, y2), lambda e: ref(e, y2), x2)
    r = x2.detach().flip(0)
    tri, ref = pair(loss, 0.4)
    assert_close_vg(lambda e: tri(e, y2, ref_emb=r, ref_labels=y2),
                    lambda e: ref(e, y2, ref_emb=r, ref_labels=y2), x2)
    assert not op_calls


def test_opcheck():
    from metrix_ops.ops.ms_metrix import label_sorted
    g = torch.Generator().manual_seed(4)
    y = _labels([3, 1, 5, 2, 6], g)
    x = F.normalize(torch.randn(len(y), 5, dtype=torch.float64, generator=g), dim=1)
    xs, ys, _ = label_sorted(*on_dev(x, y))
    ops = torch.ops.metrix_ops
    for anchor_neg in (False, True):
        args = (xs.clone().requires_grad_(), ys, 2.0, 50.0, 0.5, 0.3, anchor_neg)
        torch.library.opcheck(ops.triton_ms_metrix.default, args)
        mix, lp, ln = ops.triton_ms_metrix(*args)
        gm = torch.randn(len(y), dtype=torch.float64, generator=g).to(DEVICE)
        torch.library.opcheck(ops.triton_ms_metrix_bwd.default,
                              (gm, xs, ys, lp.detach(), ln.detach(), 2.0, 50.0, 0.5, 0.3,
                               anchor_neg))
        for cosine, pm, nm in ((False, 0.0, 1.0), (True, 0.9, 0.1)):
            args = (xs.clone().requires_grad_(), ys, cosine, pm, nm, 0.3, anchor_neg)
            torch.library.opcheck(ops.triton_contrastive_metrix.default, args)
            torch.library.opcheck(ops.triton_contrastive_metrix_bwd.default,
                                  (gm, gm.flip(0), xs, ys, cosine, pm, nm, 0.3, anchor_neg))
        # the shared two-side op (lse_metrix.py): Circle's kind, GeneralizedLifted's two
        # (with a side switched off, as at λ = 0)
        from metrix_ops.triton.circle_metrix import CIRCLE_MIX
        from metrix_ops.triton.generalized_lifted_metrix import LIFTED_MIX_COS, LIFTED_MIX_L2
        for kind, consts in ((CIRCLE_MIX, [80.0, 1.25, -0.25, 0.75, 0.25]),
                             (LIFTED_MIX_L2, [0.1, 0.9, 3e-15, 1.0, 1.0]),
                             (LIFTED_MIX_COS, [0.8, 0.2, 3e-15, 0.0, 1.0])):
            args = (xs.clone().requires_grad_(), ys, kind, consts, 0.3, anchor_neg)
            torch.library.opcheck(ops.triton_lse_metrix.default, args)
            _, lp, ln = ops.triton_lse_metrix(*args)
            torch.library.opcheck(ops.triton_lse_metrix_bwd.default,
                                  (gm, xs, ys, lp.detach(), ln.detach(), kind, consts, 0.3,
                                   anchor_neg))


def test_chunk_table_packs_whole_classes_and_cuts_larger_ones():
    from metrix_ops.triton.metrix_tiles import MAX_CLASS, SPLIT_KB, chunk_table
    ys = torch.tensor(sorted([0] * 5 + [1] * 9 + [2] * 2 + [3] * 16 + [4] * 1))
    for anchor_neg in (False, True):
        table, kb, sizes, split = chunk_table(ys, anchor_neg)
        assert kb == 16 and not split  # 5 + 9 + 2 rows share one chunk; positives its own
        assert table.view(-1, 4).tolist() == [[0, 16, 0, 16], [16, 32, 16, 32], [32, 33, 32, 33]]
        assert sizes.tolist() == [5] * 5 + [9] * 9 + [2] * 2 + [16] * 16 + [1]
    table, kb, sizes, split = chunk_table(torch.zeros(17, dtype=torch.long), False)
    assert kb == 32 and table.tolist() == [0, 17, 0, 17] and sizes.tolist() == [17] * 17
    # a class over MAX_CLASS rows: blocks of SPLIT_KB whose positives are the whole class;
    # the classes of at most SPLIT_KB rows around it are still packed
    big = MAX_CLASS + 5
    ys = torch.tensor([0] * 3 + [1] * big + [2] * 2 + [3] * 4)
    table, kb, sizes, split = chunk_table(ys, False)
    blocks = [(a, min(a + SPLIT_KB, 3 + big), 3, 3 + big) for a in range(3, 3 + big, SPLIT_KB)]
    assert kb == SPLIT_KB and split
    assert table.view(-1, 4).tolist() == [[0, 3, 0, 3], *map(list, blocks),
                                          [3 + big, 9 + big, 3 + big, 9 + big]]
    # under anchor_neg a block's one positive per anchor is itself: nothing to split
    table, kb, _, split = chunk_table(ys, True)
    assert kb == SPLIT_KB and not split
    assert table.view(-1, 4).tolist()[1:-1] == [[a, b, a, b] for a, b, _, _ in blocks]


def test_ee_unit_chunks_keep_segments_whole():
    """pairs="all": units are whole classes; "adjacent": pairs of rows, so a class of any
    size is cut between pairs; no segment: single rows."""
    from metrix_ops.reference.expansion_points import expansion_segments as segments
    from metrix_ops.triton.ee_chunks import EE_MAX_CLASS, unit_chunks
    ys = torch.tensor(sorted([0] * 5 + [1] * 9 + [2] * 2 + [3] * 16 + [4] * 1))
    chunks, kb, most_ends = unit_chunks(ys, *segments(ys, "all"))
    assert kb == 16 and chunks.tolist() == [0, 16, 32, 33]
    assert most_ends == 15  # a row of the class of 16 ends a segment with each other one
    big = torch.zeros(EE_MAX_CLASS + 2, dtype=torch.long)
    with pytest.raises(ValueError, match=f"at most {EE_MAX_CLASS} rows with pairs='all'"):
        unit_chunks(big, *segments(big, "all"))
    chunks, kb, most_ends = unit_chunks(big, *segments(big, "adjacent"))
    assert most_ends == 1
    assert kb == 16 and chunks.tolist() == list(range(0, EE_MAX_CLASS + 2, 16)) + [EE_MAX_CLASS + 2]
    # 40 rows, one segment (18, 14) over rows 14..18: that unit of 5 opens the second chunk
    # (14 + 5 > 16), where single rows would pack as 0, 16, 32
    rows = torch.zeros(40, dtype=torch.long)
    chunks, kb, _ = unit_chunks(rows, torch.tensor([18]), torch.tensor([14]))
    assert kb == 16 and chunks.tolist() == [0, 14, 30, 40]
    chunks, _, _ = unit_chunks(rows, torch.tensor([16]), torch.tensor([15]))  # rows 15, 16
    assert chunks.tolist() == [0, 15, 31, 40]
    empty = torch.zeros(0, dtype=torch.long)
    chunks, kb, most_ends = unit_chunks(torch.zeros(20, dtype=torch.long), empty, empty)
    assert kb == 16 and chunks.tolist() == [0, 16, 20] and most_ends == 0
    # the segments are checked in the same read: ends out of the batch, ends of two labels
    with pytest.raises(ValueError, match=r"rows of the batch, in \[0, 20\)"):
        unit_chunks(rows[:20], torch.tensor([3]), torch.tensor([20]))
    two = torch.tensor([0] * 10 + [1] * 10)
    with pytest.raises(ValueError, match=r"segment \(9, 10\) joins rows of different labels"):
        unit_chunks(two, torch.tensor([0, 9]), torch.tensor([1, 10]))


@pytest.fixture
def small_blocks(monkeypatch):
    """Cut classes over 16 rows into blocks of 16 (the kernels' least), so that small batches
    take the cut-class path; the tables the ops built, recorded."""
    import metrix_ops.triton.metrix_tiles as tiles
    monkeypatch.setattr(tiles, "MAX_CLASS", 16)
    monkeypatch.setattr(tiles, "SPLIT_KB", 16)
    tables, real = [], tiles.chunk_table
    monkeypatch.setattr(tiles, "chunk_table",
                        lambda *a: tables.append(real(*a)) or tables[-1])
    return tables


# a class cut into three blocks (the last partial) beside packed small classes, a class of one
# and a second cut class; classes of exactly one block's rows beside one that is cut
@pytest.mark.parametrize("sizes", [[37, 3, 1, 20, 5], [17, 16, 1]])
@pytest.mark.parametrize("lam,pairs", [(0.45, "pos_neg"), (0.7, "anchor_neg")])
def test_classes_cut_into_blocks_fp64(loss, sizes, lam, pairs, op_calls, small_blocks):
    """A class larger than a chunk: its blocks' positives range over the whole class (the
    forward's loop over the class's blocks, the gradient's row programs taking each pair of
    blocks both ways, the column programs both tiles' parts)."""
    g = torch.Generator().manual_seed(sum(sizes) + int(10 * lam))
    y = _labels(sizes, g)
    x, y = on_dev(torch.randn(len(y), 6, dtype=torch.float64, generator=g), y)
    tri, ref = pair(loss, lam, weight=1.3, pairs=pairs)
    assert_close_vg(lambda e: tri(e, y), lambda e: ref(e, y), x)
    assert op_calls and small_blocks
    assert all(t[3] == (pairs == "pos_neg") for t in small_blocks)  # split only for pos_neg


def test_a_class_over_max_class_at_the_real_block_size(loss, op_calls):
    """The cut at the shipped sizes (MAX_CLASS, SPLIT_KB): values and gradients equal the
    reference's, and the Triton op ran (no fallback: there is no class limit)."""
    from metrix_ops.triton.metrix_tiles import MAX_CLASS
    g = torch.Generator().manual_seed(71)
    y = _labels([MAX_CLASS + 6, 4, 1], g)
    x, y = on_dev(torch.randn(len(y), 5, dtype=torch.float64, generator=g), y)
    tri, ref = pair(loss, 0.4, weight=1.1)
    assert_close_vg(lambda e: tri(e, y), lambda e: ref(e, y), x)
    assert op_calls


_SM90 = r'''
import metrix_ops.triton.ms_metrix as mm
import metrix_ops.triton.contrastive_metrix as cm
import metrix_ops.triton.circle_metrix as ci
import metrix_ops.triton.generalized_lifted_metrix as gl
import metrix_ops.triton.lse_metrix as lm
import metrix_ops.triton.metrix_tiles as mt

failed = []
ptrs = {"lab_ptr": "*i64", "cnt_ptr": "*i32", "chunk_ptr": "*i32", "pc_ptr": "*i32",
        "nc_ptr": "*i32"}
for fdt, acc, prec, kb, bn, width, split in [("fp32", tl.float32, "tf32", 16, 32, 128, False),
                                             ("fp32", tl.float32, "tf32", 64, 16, 512, False),
                                             ("fp32", tl.float32, "tf32", 16, 16, 512, True),
                                             ("fp64", tl.float64, "ieee", 16, 32, 512, False),
                                             ("fp64", tl.float64, "ieee", 16, 16, 512, True)]:
    tiles = dict(KB=kb, BLOCK_N=bn, BLOCK_D=64, ACC=acc, PRECISION=prec, ANCHOR_NEG=False,
                 SPLIT=split, BLOCK_DO=width)
    cases = [(mm._ms_mix_fwd_kernel, {})]
    weights = [mm._ms_mix_weights]
    if kb == 16 and fdt == "fp32":  # every loss at the common chunk height (SPLIT_KB too);
        # the tallest chunk and fp64 for MS only
        cases += [(cm._con_mix_fwd_kernel, {"COSINE": False}),
                  (cm._con_mix_fwd_kernel, {"COSINE": True})]
        cases += [(lm.lse_mix_fwd_kernel, {"LOGITS": f}) for f in
                  (ci._circle_mix_logits, gl._lifted_mix_logits_l2, gl._lifted_mix_logits_cos)]
        weights += [cm._con_mix_weights_l2, cm._con_mix_weights_cos, ci._circle_mix_weights,
                    gl._lifted_mix_weights_l2, gl._lifted_mix_weights_cos]
    for w in weights:
        cases += [(mt.mix_grad_rows_kernel, {"WEIGHTS": w}), (mt.mix_grad_cols_kernel, {"WEIGHTS": w})]
    for fn, extra in cases:
        consts = {k: v for k, v in dict(tiles, **extra).items() if k in fn.arg_names}
        try:
            compile_sm90(fn, consts, fdt, num_warps=4 if width <= 128 else 8, pointer_types=ptrs)
        except Exception as e:  # noqa: BLE001
            failed.append(f"{fn.__name__} {fdt} KB{kb} D{width} split={split}: {type(e).__name__}: {str(e)[:300]}")
print("\n".join(failed))
sys.exit(1 if failed else 0)
'''


@compiles_only
def test_kernels_compile_for_h100():
    """The Metrix kernels (forward of each loss, the shared gradient kernels with each loss's
    weights) compile for sm_90 at GPU tile sizes, fp32 and fp64, with and without a cut class
    (SPLIT, at SPLIT_KB = 16: every loss in fp32, MS in fp64)."""
    run_sm90_script(_SM90)


def test_gpu_launch_settings():
    """The settings chosen for CUDA tensors from ptxas's spill report (GPU_NOTES.md): the
    Metrix gradient kernels take half the forward's columns; EE mining 32×32 tiles, 4 warps.
    Checked with a stand-in for a CUDA tensor (only its device, shape and dtype are read)."""
    import types
    from metrix_ops.triton.ee_hphn import mine_config
    from metrix_ops.triton.metrix_tiles import mix_config
    x = torch.empty(4096, 512)
    fake = types.SimpleNamespace(device=torch.device("cuda"), shape=x.shape, dtype=x.dtype,
                                 element_size=x.element_size)
    fwd, _, _ = mix_config(fake, 16)
    grad, block_do, warps = mix_config(fake, 16, grad=True)
    assert (fwd["BLOCK_N"], grad["BLOCK_N"], block_do) == (32, 16, 512)
    assert warps["num_warps"] == 8 and "BLOCK_M" not in grad
    assert mix_config(fake, 64, grad=True)[0]["BLOCK_N"] == 16  # tl.dot's least
    units, cfg, warps_o, warps_s = mine_config(fake)  # EE mining: original / segment rows
    assert units == dict(BRO=32, BRS=16, BCO=32, BCS=16) and cfg["BLOCK_D"] == 32
    assert (warps_o["num_warps"], warps_s["num_warps"]) == (4, 8)
    # on CPU tensors (the interpreter) the settings stay the larger, faster-to-interpret ones
    assert mix_config(x, 16, grad=True)[0]["BLOCK_N"] == 32
