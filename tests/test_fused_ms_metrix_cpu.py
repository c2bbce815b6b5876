"""MultiSimilarityLoss with embedding-level Metrix (pos_neg) through the one fused CPU op,
against the reference (closed-form candidates over dense B×B×B tensors): values and
gradients over the shared cases, λ at and inside [0, 1], blocks cut between classes, a class
larger than a block; the op's checks, opcheck, and that the module really uses the op."""
import pytest
import torch
import torch.nn.functional as F

import metrix_ops as mo
from cases import CASE_IDS, CASES, assert_close_vg, make_case
from metrix_ops import _ext

pytestmark = pytest.mark.skipif(not _ext.HAS_EXT, reason="extension not built")


def pair(lam, weight=0.4, pairs="pos_neg", **kw):
    cfg = mo.Metrix(level="embedding", pairs=pairs, lam=lam, weight=weight)
    return (mo.losses.MultiSimilarityLoss(backend="cpu", metrix=cfg, **kw),
            mo.losses.MultiSimilarityLoss(backend="reference", metrix=cfg, **kw))


@pytest.fixture
def op_calls(monkeypatch):
    """How many times the module reached the fused Metrix op."""
    import metrix_ops.fused.multi_similarity as fms
    calls, real = [], fms.ms_metrix_rows
    monkeypatch.setattr(fms, "ms_metrix_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("lam,pairs", [(0.0, "pos_neg"), (0.3, "pos_neg"), (0.85, "pos_neg"),
                                       (1.0, "pos_neg"), (0.3, "anchor_neg"), (1.0, "anchor_neg")])
def test_matches_reference_fp64(case, lam, pairs, op_calls):
    x, y = make_case(case)
    fused, ref = pair(lam, pairs=pairs)
    assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x)
    assert op_calls


@pytest.mark.parametrize("kw", [{"alpha": 1.3, "beta": 20.0, "base": 0.3},
                                {"alpha": 4.0, "beta": 80.0, "base": 0.7}])
def test_hyper_parameters_and_weight(kw, op_calls):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(29, 9, dtype=torch.float64, generator=g)
    y = torch.randint(0, 5, (29,), generator=g)
    fused, ref = pair(0.4, weight=1.7, **kw)
    assert_close_vg(lambda e: fused(e, y), lambda e: ref(e, y), x)
    assert op_calls


def test_fp32_matches_fp64_reference():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(67, 24, generator=g)
    y = torch.randint(0, 9, (67,), generator=g)
    fused, ref = pair(0.35)
    assert_close_vg(lambda e: fused(e, y).double(), lambda e: ref(e.double(), y), x,
                    rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 16, generator=g).to(dtype)
    y = torch.randint(0, 6, (40,), generator=g)
    fused, ref = pair(0.6)
    v = fused(x.requires_grad_(True), y)
    v.backward()
    assert v.dtype == torch.float32 and torch.isfinite(x.grad).all()
    torch.testing.assert_close(v, ref(x.detach().float(), y), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("block", [1, 4, 9, 1000])
def test_blocks_cut_between_classes(block):
    """Blocks of `block` rows rounded to whole classes: several blocks, a class larger than
    a block (it gets a block of its own), one block; unequal row weights on both outputs."""
    from metrix_ops.ops.ms_metrix import ms_metrix_rows
    g = torch.Generator().manual_seed(block)
    x = torch.randn(37, 6, dtype=torch.float64, generator=g)
    y = torch.cat([torch.full((7,), 3), torch.randint(0, 8, (30,), generator=g)])[torch.randperm(37, generator=g)]
    w1, w2 = torch.rand(37, dtype=torch.float64, generator=g), torch.rand(37, dtype=torch.float64, generator=g)
    lam = 0.45

    def fused(e):
        rows, mix = ms_metrix_rows(F.normalize(e, dim=1), y, 2.0, 50.0, 0.5, lam, block=block)
        return (rows * w1).sum() + (mix * w2).sum()

    def ref(e):
        from metrix_ops.reference.metrix import _in_batch_candidates
        from metrix_ops.reference.multi_similarity import multi_similarity_loss_dict
        from metrix_ops.reference.pairs import match_masks
        from metrix_ops.spec import LossInputs
        u = F.normalize(e, dim=1)
        inp = LossInputs(u, y, None, u, y, True, mo.distances.CosineSimilarity())
        rows = multi_similarity_loss_dict(inp)["loss"]["losses"]
        pos, neg = match_masks(y, y, True)
        s, yy, member = _in_batch_candidates(u @ u.t(), u @ u.t(), pos, neg, lam, "pos_neg")
        lp = torch.where(member, -2.0 * (s - 0.5) + torch.log(yy), -torch.inf)
        ln = torch.where(member, 50.0 * (s - 0.5) + torch.log(1 - yy), -torch.inf)
        zero = torch.zeros(len(e), 1, dtype=e.dtype)
        mix = (torch.logsumexp(torch.cat([zero, lp], 1), 1) / 2.0
               + torch.logsumexp(torch.cat([zero, ln], 1), 1) / 50.0)
        return (rows * w1).sum() + (mix * w2).sum()

    assert_close_vg(fused, ref, x)


@pytest.mark.parametrize("B,block", [(200, 64), (301, 97)])
def test_fp32_blocks_agree_with_one_block(B, block):
    """fp32 blocks large enough for the tiled transposes of the block walk
    (cpu/block_transpose.h: whole 32×32 tiles of 8×8 register transposes, and ragged edges)
    give the values and gradients of one block, which needs no transpose."""
    from metrix_ops.ops.ms_metrix import ms_metrix_rows
    g = torch.Generator().manual_seed(B)
    x = F.normalize(torch.randn(B, 11, generator=g), dim=1)
    y = torch.randint(0, B // 6, (B,), generator=g)
    w1, w2 = torch.rand(B, generator=g), torch.rand(B, generator=g)

    def run(blk):
        e = x.clone().requires_grad_(True)
        rows, mix = ms_metrix_rows(e, y, 2.0, 50.0, 0.5, 0.4, block=blk)
        ((rows * w1).sum() + (mix * w2).sum()).backward()
        return rows.detach(), mix.detach(), e.grad

    for got, want in zip(run(block), run(10 * B)):  # fp32 sums in another order
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


def test_module_uses_the_fused_op(op_calls):
    calls = op_calls
    x, y = torch.randn(12, 5), torch.randint(0, 3, (12,))
    auto = mo.losses.MultiSimilarityLoss(metrix=mo.Metrix(lam=0.5))
    auto(x, y)
    assert calls, "backend='auto' did not take the fused Metrix op"
    # what it does not cover goes to the reference (auto) or raises (cpu)
    calls.clear()
    mo.losses.MultiSimilarityLoss(metrix=mo.Metrix(lam=0.5, pairs="pos_pos"))(x, y)
    mo.losses.MultiSimilarityLoss(metrix=mo.Metrix(lam=0.5, pairs="neg_neg"))(x, y)
    assert not calls  # against references: the refs op (test_metrix_refs_op.py)


def test_drawn_lambda_is_the_reference_draw():
    """λ drawn per call (no fixed λ): the same draw reaches both backends."""
    x, y = torch.randn(15, 4, dtype=torch.float64), torch.randint(0, 4, (15,))
    cfg = mo.Metrix(alpha=2.0)
    torch.manual_seed(11)
    a = mo.losses.MultiSimilarityLoss(backend="cpu", metrix=cfg)(x, y)
    torch.manual_seed(11)
    b = mo.losses.MultiSimilarityLoss(backend="reference", metrix=cfg)(x, y)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_op_rejects_unsorted_labels_and_bad_lambda():
    x = F.normalize(torch.randn(6, 3), dim=1)
    with pytest.raises(RuntimeError, match="labels must be sorted"):
        torch.ops.metrix_ops.ms_metrix_self_fwd(x, torch.tensor([0, 1, 0, 1, 2, 2]), 2.0, 50.0,
                                                0.5, 0.5, False, 64)
    with pytest.raises(RuntimeError, match="lam must be in"):
        torch.ops.metrix_ops.ms_metrix_self_fwd(x, torch.tensor([0, 0, 1, 1, 2, 2]), 2.0, 50.0,
                                                0.5, 1.5, False, 64)
    with pytest.raises(RuntimeError, match="labels must be int64"):
        torch.ops.metrix_ops.ms_metrix_self_fwd(x, torch.zeros(6, dtype=torch.int32), 2.0, 50.0,
                                                0.5, 0.5, False, 64)


@pytest.mark.parametrize("anchor_neg", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype, anchor_neg):
    x = F.normalize(torch.randn(14, 5, dtype=dtype), dim=1).requires_grad_(True)
    y = torch.sort(torch.randint(0, 4, (14,))).values
    torch.library.opcheck(torch.ops.metrix_ops.ms_metrix_self_fwd.default,
                          (x, y, 2.0, 50.0, 0.5, 0.3, anchor_neg, 4))


def test_backward_op_checks_its_row_vectors():
    """A direct call with a row vector of the wrong length is refused, not read past its end."""
    x = F.normalize(torch.randn(6, 3, dtype=torch.float64), dim=1)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    out = torch.ops.metrix_ops.ms_metrix_self_fwd(x, y, 2.0, 50.0, 0.5, 0.5, False, 64)
    g, short = torch.ones(6, dtype=x.dtype), torch.ones(5, dtype=x.dtype)
    args = [g, g, x, y, out[1], out[2], out[4], out[5], 2.0, 50.0, 0.5, 0.5, False, 64]
    torch.ops.metrix_ops.ms_metrix_self_bwd(*args)  # the right lengths pass
    for k, name in [(1, "grad_mix"), (6, "tp")]:
        bad = list(args)
        bad[k] = short
        with pytest.raises(RuntimeError, match=rf"{name} must be of shape \(6,\)"):
            torch.ops.metrix_ops.ms_metrix_self_bwd(*bad)
    with pytest.raises(RuntimeError, match=r"grad_rows must be of shape \(6,\)"):
        torch.ops.metrix_ops.ms_loss_self_bwd(short, x, y, out[1], out[2], 2.0, 50.0, 0.5, 64)
