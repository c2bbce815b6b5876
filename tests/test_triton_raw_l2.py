"""The L2 distance of unnormalised rows (LpDistance(normalize_embeddings=False), p = 2) on the
Triton engine: the raw rows through the contrastive, generalized-lifted and lifted-structure
kernels (RAW: each product read as 1 − d²/2, tiles.raw_unit_sims) and the all-triplets
kernels (`raw`), both with a threshold of d = 0 scaled by the norms and d²'s radial
gradient, the squared form through the cosine keys read as 1 − d²/2;
BatchHardMiner's picks by the raw rows' 1 − d²/2 and TripletMarginMiner's window. Values and
gradients against the reference (fp64, the shared cases), PML (fp32 past cdist's 25-row
switch, fp64 for the miners) and exact differences (coincident rows), ref_emb, and what
stays out.

Without a GPU these run under TRITON_INTERPRET=1 on CPU tensors; otherwise they are skipped."""
import pytest
import torch
from pytorch_metric_learning import distances as pd
from pytorch_metric_learning import losses as pl
from pytorch_metric_learning import miners as pm

import metrix_ops as mo
from cases import CASE_IDS, CASES, assert_close_vg, make_case
from raw_l2_cases import (COINCIDENT, LOSSES, REFS, check_coincident_rows, loss_ids, ours_on,
                          raw, rows_past_cdist_switch, scaled_case)
from triton_cases import DEVICE, on_dev, requires_triton, widest_dtype

pytestmark = requires_triton

LOSS_IDS = loss_ids(LOSSES)


ours = ours_on("triton")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("loss", LOSSES, ids=LOSS_IDS)
def test_matches_reference(case, loss):
    """The shared cases (no positives, one class, B = 1, duplicates...) with rows of norm
    ~3√D, as unnormalised embeddings have."""
    name, kw, power = loss
    dtype, _ = widest_dtype()
    x, y = on_dev(*scaled_case(case, dtype))
    tri, ref = ours(name, kw, power), ours(name, kw, power, "reference")
    if dtype == torch.float64:
        assert_close_vg(lambda e: tri(e, y), lambda e: ref(e, y), x)
    else:  # triton < 3.5: fp32, the product form's rounding at norms ~10
        assert_close_vg(lambda e: tri(e, y), lambda e: ref(e, y), x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("loss", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("refs", [False, True])
def test_matches_pml_fp32(loss, refs):
    """fp32 past 25 rows a side, where PML's cdist is the product form too: PML's numbers."""
    name, kw, power = loss
    if refs and name == "LiftedStructureLoss":
        pytest.skip("(Lifted's Triton kernel is the batch against itself: test_out_of_scope)")
    x, y, r, ry = rows_past_cdist_switch(11)
    x, y, r, ry = on_dev(x, y, r, ry)
    mine, theirs = ours(name, kw, power), getattr(pl, name)(distance=raw(pd, power), **kw)
    if not refs:
        assert_close_vg(lambda e: mine(e, y), lambda e: theirs(e.cpu(), y.cpu()), x,
                        rtol=2e-5, atol=2e-6)
    else:
        assert_close_vg(lambda e, q: mine(e, y, ref_emb=q, ref_labels=ry),
                        lambda e, q: theirs(e.cpu(), y.cpu(), ref_emb=q.cpu(),
                                            ref_labels=ry.cpu()),
                        x, r, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("b,d", [(1, 3), (7, 130), (33, 5)])
@pytest.mark.parametrize("power", [1, 2])
def test_triplet_odd_shapes_and_far_rows(b, d, power):
    """Odd widths (past a feature tile), and rows of norm ~1e3: the threshold of d = 0
    scales with the norms, so duplicates keep d = 0 and a zero gradient, and real
    distances keep theirs."""
    dtype, _ = widest_dtype()
    g = torch.Generator().manual_seed(b * d)
    x = 1e3 * torch.randn(b, d, dtype=dtype, generator=g) / d ** 0.5
    y = torch.randint(0, 3, (b,), generator=g)
    if b > 2:
        x[1] = x[0]
        y[1] = y[0]
    x, y = on_dev(x.requires_grad_(), y)
    kw = {"margin": 50.0 * power}
    tri, ref = ours("TripletMarginLoss", kw, power), ours("TripletMarginLoss", kw, power,
                                                          "reference")
    rtol = 1e-9 if dtype == torch.float64 else 2e-4
    assert_close_vg(lambda e: tri(e, y), lambda e: ref(e, y), x, rtol=rtol,
                    atol=rtol * 1e3)


def test_close_pairs_of_long_rows_keep_their_distance():
    """The threshold of d = 0 scales with the norms but stays within the rounding: in fp32 at
    D = 512 and norms ~68, a positive at d = 0.20 and a negative at d = 0.22 keep their
    distances (a bound of 8√D ulps zeroed both), so the loss and gradient are PML's to the
    product form's rounding."""
    g = torch.Generator().manual_seed(0)
    x, y = 3 * torch.randn(30, 512, generator=g), torch.arange(30) % 10
    u, v = torch.randn(512, generator=g), torch.randn(512, generator=g)
    x[10] = x[0] + 0.20 * u / u.norm()  # a positive of row 0
    x[1] = x[0] + 0.22 * v / v.norm()   # a negative of row 0
    x, y = on_dev(x, y)
    theirs = pl.TripletMarginLoss(distance=raw(pd, 1))
    assert_close_vg(lambda e: ours("TripletMarginLoss", {}, 1)(e, y),
                    lambda e: theirs(e.cpu(), y.cpu()), x, rtol=1e-5, atol=2e-5)


# ---- miner= as a loss option: PML's two calls, in fp64

MINERS = ["batch_hard_raw", "batch_hard_l2", "batch_hard_l2sq", "batch_hard_cosine", "all",
          "hard", "semihard", "easy"]


def miner_pair(kind, power):
    if kind.startswith("batch_hard"):
        dist = {"raw": lambda lib: raw(lib, power), "l2": lambda lib: lib.LpDistance(),
                "l2sq": lambda lib: lib.LpDistance(power=2),
                "cosine": lambda lib: lib.CosineSimilarity()}[kind.split("_")[-1]]
        return (mo.miners.BatchHardMiner(distance=dist(mo.distances)),
                pm.BatchHardMiner(distance=dist(pd)))
    return (mo.miners.TripletMarginMiner(2.0 * power, kind, distance=raw(mo.distances, power)),
            pm.TripletMarginMiner(2.0 * power, kind, distance=raw(pd, power)))


@pytest.mark.parametrize("kind", MINERS)
@pytest.mark.parametrize("power", [1, 2])
@pytest.mark.parametrize("refs", [False, True])
def test_miner_option_matches_pml(kind, power, refs):
    dtype, _ = widest_dtype()
    g = torch.Generator().manual_seed(power + 10 * refs)
    x, y = 3 * torch.randn(43, 10, dtype=dtype, generator=g), torch.randint(0, 5, (43,),
                                                                           generator=g)
    r, ry = 3 * torch.randn(29, 10, dtype=dtype, generator=g), torch.randint(0, 5, (29,),
                                                                            generator=g)
    x, y, r, ry = on_dev(x, y, r, ry)
    ours_m, pml_m = miner_pair(kind, power)
    mine = mo.losses.TripletMarginLoss(margin=2.0 * power, distance=raw(mo.distances, power),
                                       miner=ours_m, backend="triton")
    theirs = pl.TripletMarginLoss(margin=2.0 * power, distance=raw(pd, power))
    tol = {} if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    if refs:
        assert_close_vg(lambda e, q: mine(e, y, ref_emb=q, ref_labels=ry),
                        lambda e, q: theirs(e.cpu(), y.cpu(),
                                            pml_m(e.cpu(), y.cpu(), q.cpu(), ry.cpu()),
                                            ref_emb=q.cpu(), ref_labels=ry.cpu()),
                        x, r, **tol)
    else:
        assert_close_vg(lambda e: mine(e, y),
                        lambda e: theirs(e.cpu(), y.cpu(), pml_m(e.cpu(), y.cpu())), x, **tol)


def test_batch_hard_counts_and_no_triplet():
    """The miner's count of triplets is PML's; a batch without a negative is a zero loss
    that keeps the graph, with a zero gradient."""
    dtype, _ = widest_dtype()
    g = torch.Generator().manual_seed(5)
    x, y = on_dev(3 * torch.randn(30, 6, dtype=dtype, generator=g), torch.arange(30) % 4)
    miner = mo.miners.BatchHardMiner(distance=raw(mo.distances, 1))
    mo.losses.TripletMarginLoss(distance=raw(mo.distances, 1), miner=miner,
                                backend="triton")(x, y)
    theirs = pm.BatchHardMiner(distance=raw(pd, 1))
    assert miner.num_triplets == len(theirs(x.cpu(), y.cpu())[0]) == 30
    z = x.detach().clone().requires_grad_()
    v = mo.losses.TripletMarginLoss(distance=raw(mo.distances, 1), miner=miner,
                                    backend="triton")(z, torch.zeros_like(y))
    v.backward()
    assert float(v.detach()) == 0.0 and torch.equal(z.grad, torch.zeros_like(z))


def test_squared_unit_l2_contrastive():
    """The squared L2 of unit rows runs on the contrastive kernels too (op_form's cosine
    kernels at moved margins), against the reference."""
    dtype, _ = widest_dtype()
    dist = mo.distances.LpDistance(power=2)
    kw = {"pos_margin": 0.1, "neg_margin": 1.5}
    tri = mo.losses.ContrastiveLoss(distance=dist, backend="triton", **kw)
    ref = mo.losses.ContrastiveLoss(distance=dist, backend="reference", **kw)
    for case in (CASES[0], CASES[1]):
        x, y = on_dev(*make_case(case, dtype))
        tol = {} if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
        assert_close_vg(lambda e: tri(e, y), lambda e: ref(e, y), x, **tol)


@pytest.mark.parametrize("name,kw,power", COINCIDENT, ids=loss_ids(COINCIDENT))
@pytest.mark.parametrize("dim", [16, 256])
def test_coincident_rows_past_25_rows_get_distance_0(name, kw, power, dim):
    """The RAW kernels take d² below 2√D ulps of the pair's squared norms as 0: coincident
    rows (at pos_margin 0 too, where noise would be a counted term) match exact differences
    past 25 rows, values and gradients, fp32 rows of norm ~40 and ~160."""
    check_coincident_rows(ours(name, kw, power), name, kw, power, dim, DEVICE)



TRITON_REFS = [c for c in REFS if c[0] != "LiftedStructureLoss"]


@pytest.mark.parametrize("name,kw,power", TRITON_REFS, ids=loss_ids(TRITON_REFS))
def test_coincident_rows_against_references(name, kw, power):
    """The general RAW kernels (anchors against references): a batch row and the reference
    it coincides with are at d = 0, as exact differences give."""
    check_coincident_rows(ours(name, kw, power), name, kw, power, 16, DEVICE, refs=True)


def test_out_of_scope():
    """What stays off this engine: Lifted against references (its kernel is the batch
    against itself), GeneralizedLifted's squared form, HPHN, Metrix (the reference's
    rule)."""
    dtype, _ = widest_dtype()
    x, y = on_dev(*make_case(CASES[1], dtype))
    x = 3 * x
    lifted = ours("LiftedStructureLoss", {}, 1)
    with pytest.raises(NotImplementedError, match="does not cover"):
        lifted(x, y, ref_emb=x[:5], ref_labels=y[:5])
    for loss in (ours("GeneralizedLiftedStructureLoss", {}, 2), ours("HPHNTripletLoss", {}, 1)):
        with pytest.raises(NotImplementedError, match="does not cover"):
            loss(x, y)
    for name in ("ContrastiveLoss", "GeneralizedLiftedStructureLoss"):
        with pytest.raises(NotImplementedError, match="Metrix mixes L2-normalised embeddings"):
            ours(name, {}, 1, metrix=mo.Metrix(lam=0.4))(x, y)


def test_squared_unit_l2_contrastive_metrix_is_not_the_mixing_op():
    """The squared L2 of unit rows is the clean contrastive op's, not its Metrix op's (which
    mixes under L2 or cosine only): the call runs the reference's Metrix term, and an
    explicit Triton backend gives the reference's numbers."""
    dtype, _ = widest_dtype()
    dist = mo.distances.LpDistance(power=2)
    kw = {"pos_margin": 0.1, "neg_margin": 1.5, "metrix": mo.Metrix(lam=0.4)}
    x, y = on_dev(*make_case(CASES[1], dtype))
    tri = mo.losses.ContrastiveLoss(distance=dist, backend="triton", **kw)
    ref = mo.losses.ContrastiveLoss(distance=dist, backend="reference", **kw)
    tol = {} if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    assert_close_vg(lambda e: tri(e, y), lambda e: ref(e, y), x, **tol)


def test_opcheck_of_the_raw_forms():
    """The ops' raw argument (contrastive, the two-side log-sum-exp of GeneralizedLifted,
    Lifted, the batch-hard mining): fake kernels, autograd registration and schema, general
    and symmetric."""
    import math

    from metrix_ops.triton.generalized_lifted import GEN_LIFTED_L2
    from test_triton_circle import check_side_lse_ops
    g = torch.Generator().manual_seed(7)
    x = 3 * torch.randn(11, 4, dtype=torch.float64, generator=g)
    r = 3 * torch.randn(7, 4, dtype=torch.float64, generator=g)
    x[4] = x[1]  # a coincident pair
    x, r = on_dev(x, r)
    y = torch.tensor([0, 0, 0, 1, 0, 2, 2, 2, 3, 3, 4], device=DEVICE)
    ry = torch.tensor([0, 1, 1, 2, 3, 5, 0], device=DEVICE)
    ops = torch.ops.metrix_ops
    common = (False, 0.5, 6.0, 0.0, math.inf, True)
    torch.library.opcheck(ops.triton_contrastive_rows.default,
                          (x.clone().requires_grad_(), r.clone().requires_grad_(), y, ry, False,
                           False) + common)
    xs = x.clone().requires_grad_()
    torch.library.opcheck(ops.triton_contrastive_rows.default, (xs, xs, y, y, True, True) + common)
    gr = torch.randn(2, 11, dtype=torch.float64, generator=g).to(DEVICE)
    for sym, need in ((False, (True, True)), (True, (True, False))):
        torch.library.opcheck(ops.triton_contrastive_rows_bwd.default,
                              (gr[0], gr[1], x, x, y, y, True, sym) + common + need)
    check_side_lse_ops(x, r, y, ry, GEN_LIFTED_L2, [1.0, 6.0, 8 * torch.finfo(x.dtype).eps],
                       raw=True)
    ys, order = torch.sort(y, stable=True)
    xl = x[order]
    lo, hi = torch.searchsorted(ys, ys).int(), torch.searchsorted(ys, ys, right=True).int()
    args = (False, 1.0, 6.0, 0.0, math.inf, True)
    torch.library.opcheck(ops.triton_lifted_rows.default,
                          (xl.clone().requires_grad_(), ys, lo, hi) + args)
    _, _, lneg = ops.triton_lifted_rows(xl, ys, lo, hi, *args)
    gs = torch.randn(11, dtype=torch.float64, generator=g).to(DEVICE)
    torch.library.opcheck(ops.triton_lifted_rows_bwd.default, (gs, xl, ys, lo, hi, lneg) + args)
    # BatchHardMiner's picks by the raw rows' distance (the mining kernel's RAW form)
    torch.library.opcheck(ops.triton_hphn_mine.default, (x, x, y, y, True, True))
    torch.library.opcheck(ops.triton_hphn_mine.default, (x, r, y, ry, False, True))


def test_half_inputs():
    """bf16 and fp16 rows are computed in fp32 on the RAW kernels too: the fp32 loss of the
    rounded rows, and its gradient (in the rows' dtype)."""
    g = torch.Generator().manual_seed(2)
    # (no coincident rows: past 25 rows the reference's cdist gives them noise, ours 0)
    x, y = 3 * torch.randn(40, 16, generator=g), torch.randint(0, 5, (40,), generator=g)
    for dtype in (torch.bfloat16, torch.float16):
        h, yd = on_dev(x.to(dtype), y)
        for name, kw, power in LOSSES:
            hv = h.detach().requires_grad_()
            mine = ours(name, kw, power)(hv, yd)
            mine.backward()
            f = h.detach().float().requires_grad_()
            ref = ours(name, kw, power, "reference")(f, yd)
            ref.backward()
            assert mine.dtype == torch.float32 and hv.grad.dtype == dtype
            torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(hv.grad.float(), f.grad.to(dtype).float(), rtol=2e-2,
                                       atol=2e-3)
