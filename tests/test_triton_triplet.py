"""The Triton all-triplets TripletMarginLoss (backend="triton") against the reference: values
and gradients (embeddings and ref_emb) over the shared cases, odd shapes spanning several
tiles, both distances, references, reducers, margins (0: exact ties are not counted), dtypes,
a large class (many positives per anchor); the op's per-row outputs against a brute-force
enumeration; routing, errors, opcheck and compile.

Without a GPU these run under TRITON_INTERPRET=1 on CPU tensors (set before metrix_ops is
imported); otherwise they are skipped. On a CUDA machine without TRITON_INTERPRET they run the
compiled kernels."""
import pytest
import torch
import torch.nn.functional as F

import metrix_ops as mo
import metrix_ops.triton as mt
from triton_cases import DEVICE, on_dev, requires_triton
from cases import CASE_IDS, CASES, assert_close_vg, make_case, value_and_grad

pytestmark = requires_triton

COS = mo.distances.CosineSimilarity


def pair(cosine=False, **kw):
    if cosine:
        kw["distance"] = COS()
    return (mo.losses.TripletMarginLoss(backend="triton", **kw),
            mo.losses.TripletMarginLoss(backend="reference", **kw))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("cosine", [False, True], ids=["l2", "cos"])
def test_matches_reference_fp64(case, cosine):
    x, y = on_dev(*make_case(case))
    tri, ref = pair(cosine)
    assert_close_vg(lambda e: tri(e, y), lambda e: ref(e, y), x)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_squared_l2_matches_reference_fp64(case):
    """FaceNet's squared L2 on the cosine kernels at half the margin, doubled (totals_impl)"""
    x, y = on_dev(*make_case(case))
    kw = {"distance": mo.distances.LpDistance(power=2), "margin": 0.2}
    tri, ref = (mo.losses.TripletMarginLoss(backend=b, **kw) for b in ("triton", "reference"))
    assert_close_vg(lambda e: tri(e, y), lambda e: ref(e, y), x)


@pytest.mark.parametrize("b", [1, 2, 5, 17, 33])
@pytest.mark.parametrize("d,classes", [(3, 2), (16, 5), (37, 11)])
def test_odd_shapes_fp64(b, d, classes):
    g = torch.Generator().manual_seed(100 * b + d)
    x = torch.randn(b, d, dtype=torch.float64, generator=g)
    y = torch.randint(0, classes, (b,), generator=g)
    x, y = on_dev(x, y)
    tri, ref = pair(cosine=(b % 2 == 0), margin=0.2)
    assert_close_vg(lambda e: tri(e, y), lambda e: ref(e, y), x)


def _brute_rows(e, f, y, ry, exclude_diag, cosine, margin):
    """Per-anchor (Σ terms, #terms > 0, #triplets) by enumerating every triplet. The op takes
    unit rows as given, its L2 distance is √(2 − 2s) (the gradient flows through s)."""
    s = e @ f.T
    # √ with a 0 slope at d = 0 (the op's rule): on a GPU s_ii can round to 1 exactly, and
    # √0's infinite slope times the masked-out diagonal's 0 would make NaN gradients
    q = (2 - 2 * s).clamp_min(0)
    k = -s if cosine else torch.where(q > 0, torch.where(q > 0, q, 1).sqrt(), 0)
    same = y[:, None] == ry[None, :]
    valid = torch.ones_like(same)
    if exclude_diag:
        valid[torch.arange(len(y)), torch.arange(len(y))] = False
    pos, neg = same & valid, ~same & valid
    v = (k[:, :, None] - k[:, None, :]) + margin  # [i, p, n]
    m = pos[:, :, None] & neg[:, None, :]
    t = torch.where(m, F.relu(v), torch.zeros_like(v))
    return t.sum((1, 2)), ((t > 0) & m).sum((1, 2)), m.sum((1, 2))


@pytest.mark.parametrize("b,m", [(23, 23), (40, 9), (7, 45)])
@pytest.mark.parametrize("cosine", [False, True], ids=["l2", "cos"])
def test_rows_op_with_unequal_row_weights(b, m, cosine):
    """The op's per-row outputs against an enumeration, rows weighted unequally: the row
    scaling of G in both gradient kernels, into x and into r."""
    from metrix_ops.triton.triplet_margin import triplet_all_rows_triton
    g = torch.Generator().manual_seed(b + m)
    x = F.normalize(torch.randn(b, 6, dtype=torch.float64, generator=g), dim=1)
    r = F.normalize(torch.randn(m, 6, dtype=torch.float64, generator=g), dim=1)
    y, ry = torch.randint(0, 4, (b,), generator=g), torch.randint(0, 4, (m,), generator=g)
    w = torch.randn(b, dtype=torch.float64, generator=g)
    x, r, y, ry, w = on_dev(x, r, y, ry, w)
    args = [(y, ry, False)] + ([(y, y, True)] if b == m else [])
    for lab, rlab, excl in args:
        rows, nz, n = triplet_all_rows_triton(x, r, lab, rlab, excl, cosine, 0.1)
        er, enz, en = _brute_rows(x, r, lab, rlab, excl, cosine, 0.1)
        torch.testing.assert_close(rows, er, rtol=1e-6, atol=1e-9)
        assert torch.equal(nz, enz) and torch.equal(n, en)
        assert_close_vg(
            lambda e, f: (triplet_all_rows_triton(e, f, lab, rlab, excl, cosine, 0.1)[0] * w).sum(),
            lambda e, f: (_brute_rows(e, f, lab, rlab, excl, cosine, 0.1)[0] * w).sum(), x, r)
    if b == m:  # the batch against itself: one tensor passed twice takes both gradients
        assert_close_vg(
            lambda e: (triplet_all_rows_triton(e, e, y, y, True, cosine, 0.1)[0] * w).sum(),
            lambda e: (_brute_rows(e, e, y, y, True, cosine, 0.1)[0] * w).sum(), x)


def test_ref_emb_reducers_and_margins():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(15, 8, dtype=torch.float64, generator=g)
    r = torch.randn(26, 8, dtype=torch.float64, generator=g)
    y, ry = torch.randint(0, 4, (15,), generator=g), torch.randint(0, 4, (26,), generator=g)
    x, r, y, ry = on_dev(x, r, y, ry)
    R = mo.reducers
    for red, margin, cosine in [(None, 0.05, False), (R.MeanReducer(), 0.3, True),
                                (R.SumReducer(), 0.0, False), (R.ThresholdReducer(low=0), 0.1, True),
                                (R.ThresholdReducer(low=0.01, high=0.5), 0.2, False)]:
        tri, ref = pair(cosine, reducer=red, margin=margin)
        assert_close_vg(lambda e, f: tri(e, y, ref_emb=f, ref_labels=ry),
                        lambda e, f: ref(e, y, ref_emb=f, ref_labels=ry), x, r)
        # ref_labels *is* labels: the diagonal pairs are dropped, as in-batch
        assert_close_vg(lambda e, f: tri(e, y, ref_emb=f, ref_labels=y),
                        lambda e, f: ref(e, y, ref_emb=f, ref_labels=y), x, r[:15])
    # only ref_emb needs a gradient: the dX kernel is skipped
    tri, ref = pair()
    f = r.clone().requires_grad_()
    (gr,) = torch.autograd.grad(tri(x, y, ref_emb=f, ref_labels=ry), f)
    f2 = r.clone().requires_grad_()
    (gr_ref,) = torch.autograd.grad(ref(x, y, ref_emb=f2, ref_labels=ry), f2)
    torch.testing.assert_close(gr, gr_ref, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("cosine", [False, True], ids=["l2", "cos"])
def test_margin_zero_ties_and_duplicates(cosine):
    """Margin 0 with duplicated rows: the tied triplets (a positive and a negative that are
    one point) have violation exactly 0 and are not counted by AvgNonZero; d = 0 pairs give
    no gradient. Cosine ties are compared with an enumeration whose S gives identical rows
    identical values: the reference's BLAS product may round two equal columns apart, and
    then counts a 1e-17 "violation" the tiles (one code path per entry) do not."""
    from metrix_ops.triton.triplet_margin import triplet_all_rows_triton
    x, y = on_dev(*make_case(CASES[-1]))
    x = torch.cat([x, x[:4]]).detach()
    y = torch.cat([y, (y[:4] + 1) % 3])
    for margin in (0.0, 0.05):
        tri, ref = pair(cosine, margin=margin)
        if not cosine or margin > 0:
            assert_close_vg(lambda e: tri(e, y), lambda e: ref(e, y), x)
    xu = F.normalize(x, dim=1)
    rows, nz, n = triplet_all_rows_triton(xu, xu, y, y, True, cosine, 0.0)
    s = (xu[:, None, :] * xu[None, :, :]).sum(-1)  # equal rows, equal sums
    # √ with a 0 slope at d = 0 (the op's rule): on a GPU s_ii can round to 1 exactly, and
    # √0's infinite slope times the masked-out diagonal's 0 would make NaN gradients
    q = (2 - 2 * s).clamp_min(0)
    k = -s if cosine else torch.where(q > 0, torch.where(q > 0, q, 1).sqrt(), 0)
    same = y[:, None] == y[None, :]
    eye = torch.eye(len(y), dtype=torch.bool, device=DEVICE)
    m = (same & ~eye)[:, :, None] & (~same)[:, None, :]
    v = torch.where(m, (k[:, :, None] - k[:, None, :]) + 0.0, torch.zeros_like(m, dtype=k.dtype))
    assert torch.equal(nz, (v > 0).sum((1, 2))) and torch.equal(n, m.sum((1, 2)))
    torch.testing.assert_close(rows, v.clamp_min(0).sum((1, 2)), rtol=1e-6, atol=1e-9)
    if cosine:
        assert int(((v == 0) & m).sum()) > 0  # the case has exact ties


def test_large_class_many_positives():
    """One class of 22 (21 positives per anchor) among small ones."""
    g = torch.Generator().manual_seed(5)
    y = torch.cat([torch.zeros(22, dtype=torch.long), torch.randint(1, 5, (5,), generator=g)])
    x = torch.randn(27, 5, dtype=torch.float64, generator=g)
    x, y = on_dev(x, y)
    tri, ref = pair(margin=0.5)
    assert_close_vg(lambda e: tri(e, y), lambda e: ref(e, y), x)


def test_fp32_matches_fp64_reference():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(45, 20, generator=g)
    y = torch.randint(0, 6, (45,), generator=g)
    x, y = on_dev(x, y)
    tri, ref = pair(margin=0.2)
    v, (gx,) = value_and_grad(lambda e: tri(e, y), x)
    vr, (gr,) = value_and_grad(lambda e: ref(e, y), x.double())
    assert v.dtype == torch.float32 and gx.dtype == torch.float32
    torch.testing.assert_close(v.double(), vr, rtol=1e-4, atol=1e-7)
    assert (gx.double() - gr).abs().max().item() <= 1e-4 * gr.abs().max().item()


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_half_inputs(dtype, tol):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 16, generator=g).to(dtype)
    y = torch.randint(0, 6, (40,), generator=g)
    x, y = on_dev(x, y)
    tri, ref = pair(margin=0.3)
    v, (gx,) = value_and_grad(lambda e: tri(e, y), x)
    vr, (gr,) = value_and_grad(lambda e: ref(e, y), x.double())
    assert gx.dtype == dtype and torch.isfinite(gx).all()
    assert abs(float(v) - float(vr)) <= 5 * tol * abs(float(vr))
    assert (gx.double() - gr).abs().max().item() <= 10 * tol * gr.abs().max().item()


@pytest.mark.parametrize("dtype", [
    torch.float16,
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
        mt.interpreting(), reason="triton 3.8's interpreter computes bf16 tl.dot wrongly"))])
def test_half_close_pairs_keep_their_distance(dtype):
    """The op on half rows (the modules upcast halves to fp32 first; the op takes them too):
    they are unit only to their precision (‖x‖² = 1 ± 1e-2 in bf16), so distances come from
    the rows' norms: a close pair (d ≈ 0.13) keeps its distance, an exact duplicate has 0."""
    from metrix_ops.triton.triplet_margin import triplet_all_rows_triton
    g = torch.Generator().manual_seed(8)
    base = F.normalize(torch.randn(3, 16, generator=g), dim=1)
    x = torch.cat([base, base + 0.03 * torch.randn(3, 16, generator=g), base[:1]])
    x = F.normalize(x, dim=1).to(dtype)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    x, y = on_dev(x, y)
    rows, nz, n = triplet_all_rows_triton(x, x, y, y, True, False, 0.5)
    k = torch.cdist(x.double(), x.double())  # the exact distances of the half rows
    assert float(k[0, 3]) > 0.05 and float(k[0, 6]) == 0.0
    same = y[:, None] == y[None, :]
    eye = torch.eye(len(y), dtype=torch.bool, device=DEVICE)
    m = (same & ~eye)[:, :, None] & (~same)[:, None, :]
    v = torch.where(m, (k[:, :, None] - k[:, None, :]) + 0.5, torch.zeros_like(k[:, :, None]))
    torch.testing.assert_close(rows.double(), v.clamp_min(0).sum((1, 2)), rtol=1e-4, atol=1e-5)
    assert torch.equal(n, m.sum((1, 2))) and torch.equal(nz, (v > 0).sum((1, 2)))


def test_backend_triton_runs_the_kernels(monkeypatch):
    """backend="triton" launches these kernels (forward, both gradient kernels), never the
    CPU op."""
    import metrix_ops.fused.triplet_margin as cpu_glue
    import metrix_ops.triton.triplet_margin as ttm

    calls = []
    for name in ("_tri_pos_keys_kernel", "_tri_fwd_kernel", "_tri_pos_counts_kernel",
                 "_tri_grad_dx_kernel", "_tri_grad_dr_kernel"):
        kern = getattr(ttm, name)

        class Spy:
            def __init__(self, name, kern):
                self.name, self.kern = name, kern

            def __getitem__(self, grid):
                calls.append(self.name)
                return self.kern[grid]

        monkeypatch.setattr(ttm, name, Spy(name, kern))

    def no_cpu(*a, **k):
        raise AssertionError("the CPU op ran")

    monkeypatch.setattr(cpu_glue, "triplet_all_rows", no_cpu)
    x, y = on_dev(*make_case(CASES[0]))
    loss = mo.losses.TripletMarginLoss(backend="triton")
    loss(x, y).backward()
    assert calls == ["_tri_pos_keys_kernel", "_tri_fwd_kernel", "_tri_pos_keys_kernel",
                     "_tri_pos_counts_kernel", "_tri_grad_dx_kernel", "_tri_grad_dr_kernel"]
    assert "TripletMarginLoss" in mo.backend.FUSED["triton"]


def test_refuses_outside_its_scope_and_bad_input():
    x, y = on_dev(*make_case(CASES[1]))
    for kw in ({"swap": True}, {"smooth_loss": True}, {"triplets_per_anchor": 3},
               {"distance": mo.distances.LpDistance(p=1)}):
        with pytest.raises(NotImplementedError, match="does not cover"):
            mo.losses.TripletMarginLoss(backend="triton", **kw)(x, y)
    it = mo.miners.TripletMarginMiner()(x, y)
    with pytest.raises(NotImplementedError, match="does not cover"):
        mo.losses.TripletMarginLoss(backend="triton")(x, y, it)
    tri = mo.losses.TripletMarginLoss(backend="triton")
    # an empty batch: PML's zero loss (test_empty_batch.py), on this engine's device too
    assert tri(torch.zeros(0, 5, device=DEVICE),
               torch.zeros(0, dtype=torch.long, device=DEVICE)).item() == 0.0
    with pytest.raises(ValueError, match="labels has 4 entries"):
        tri(x, y[:4])
    bad = x.detach().clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="embeddings contains NaN"):
        tri(bad, y)
    ops = torch.ops.metrix_ops
    with pytest.raises(ValueError, match="exclude_diag needs r"):
        ops.triton_triplet_all_rows(x, x[:5], y, y[:5], True, False, 0.05)


def test_opcheck():
    x = F.normalize(torch.randn(7, 4, dtype=torch.float64), dim=1).to(DEVICE)
    r = F.normalize(torch.randn(5, 4, dtype=torch.float64), dim=1).to(DEVICE)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3], device=DEVICE)
    ry = torch.tensor([0, 1, 1, 2, 5], device=DEVICE)
    ops = torch.ops.metrix_ops
    torch.library.opcheck(ops.triton_triplet_all_rows.default,
                          (x.clone().requires_grad_(), r.clone().requires_grad_(), y, ry, False,
                           False, 0.1))
    g = torch.randn(7, dtype=torch.float64, device=DEVICE)
    torch.library.opcheck(ops.triton_triplet_all_rows_bwd.default,
                          (g, x, x, y, y, True, True, 0.1, True, False))
    # raw rows (the L2 of unnormalised embeddings): the threshold and the radial part
    xr, rr = 3 * x, 2 * r
    torch.library.opcheck(ops.triton_triplet_all_rows.default,
                          (xr.clone().requires_grad_(), rr.clone().requires_grad_(), y, ry,
                           False, False, 0.5, 0, 0.0, True))
    torch.library.opcheck(ops.triton_triplet_all_rows_bwd.default,
                          (g, xr, rr, y, ry, False, False, 0.5, True, True, 0, 0.0, True))
    # ... and their squared L2, the cosine keys read as 1 − d²/2 (cosine and raw)
    torch.library.opcheck(ops.triton_triplet_all_rows.default,
                          (xr.clone().requires_grad_(), rr.clone().requires_grad_(), y, ry,
                           False, True, 0.5, 0, 0.0, True))
    torch.library.opcheck(ops.triton_triplet_all_rows_bwd.default,
                          (g, xr, rr, y, ry, False, True, 0.5, True, True, 0, 0.0, True))
