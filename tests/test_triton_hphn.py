"""The Triton HPHNTripletLoss (backend="triton", clean batch-hard triplet) against the
reference: mined indices (ties: the lowest column, as the reference), values and gradients
(embeddings and ref_emb) over the shared cases, odd shapes, both distances, margins,
reductions, dtypes; routing, errors, opcheck and compile.

Without a GPU these run under TRITON_INTERPRET=1 on CPU tensors (set before metrix_ops is
imported); otherwise they are skipped."""
import pytest
import torch
import torch.nn.functional as F

import metrix_ops as mo
from triton_cases import DEVICE, on_dev, requires_triton, widest_dtype
from cases import CASE_IDS, CASES, assert_close_vg, make_case, value_and_grad

pytestmark = requires_triton

COS = mo.distances.CosineSimilarity


def pair(cosine=False, **kw):
    if cosine:
        kw["distance"] = COS()
    return (mo.losses.HPHNTripletLoss(backend="triton", **kw),
            mo.losses.HPHNTripletLoss(backend="reference", **kw))


def ref_picks(xu, ru, y, ry, exclude_diag, cosine):
    """The reference's picks (ties: lowest column) from a tie-exact matrix: equal rows give
    equal entries (elementwise sums; a BLAS product may round equal columns apart)."""
    s = (xu[:, None, :] * ru[None, :, :]).sum(-1)
    mat = s if cosine else (xu[:, None, :] - ru[None, :, :]).pow(2).sum(-1).sqrt()
    same = y[:, None] == ry[None, :]
    valid = torch.ones_like(same)
    if exclude_diag:
        valid[torch.arange(len(y)), torch.arange(len(y))] = False
    out = []
    for mask, far in ((same & valid, True), (~same & valid, False)):
        take_max = far != cosine
        m = mat.masked_fill(~mask, float("-inf") if take_max else float("inf"))
        col = m.argmax(1) if take_max else m.argmin(1)
        out.append(torch.where(mask.any(1), col, torch.full_like(col, -1)))
    return torch.stack(out, 1)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("cosine", [False, True], ids=["l2", "cos"])
def test_matches_reference_fp64(case, cosine):
    x, y = on_dev(*make_case(case))
    tri, ref = pair(cosine)
    assert_close_vg(lambda e: tri(e, y), lambda e: ref(e, y), x)


@pytest.mark.parametrize("b", [1, 2, 5, 17, 33])
@pytest.mark.parametrize("d,classes", [(3, 2), (16, 5), (37, 11)])
def test_odd_shapes_fp64(b, d, classes):
    g = torch.Generator().manual_seed(100 * b + d)
    x = torch.randn(b, d, dtype=torch.float64, generator=g)
    y = torch.randint(0, classes, (b,), generator=g)
    x, y = on_dev(x, y)
    tri, ref = pair(cosine=(b % 2 == 0), margin=0.3)
    assert_close_vg(lambda e: tri(e, y), lambda e: ref(e, y), x)


@pytest.mark.parametrize("cosine", [False, True], ids=["l2", "cos"])
def test_mined_indices_and_ties(cosine):
    """Duplicated positives and negatives (exact ties): the lowest column wins, in one tile
    and across tiles (a duplicate 30 columns later)."""
    from metrix_ops.triton.hphn_triplet import hphn_mine_triton
    g = torch.Generator().manual_seed(7)
    x = torch.randn(40, 5, dtype=torch.float64, generator=g)
    y = torch.randint(0, 4, (40,), generator=g)
    for a, b in ((1, 0), (5, 3), (33, 2), (38, 7), (20, 21)):
        x[a] = x[b]
    y[1], y[33] = y[0], (y[2] + 1) % 4
    x, y = on_dev(x, y)
    xu = F.normalize(x, dim=1)
    got = hphn_mine_triton(xu, xu, y, y, True)
    assert torch.equal(got, ref_picks(xu, xu, y, y, True, cosine))
    r, ry = xu.flip(0).contiguous(), y.flip(0)  # a separate reference, self pairs kept
    assert torch.equal(hphn_mine_triton(xu, r, y, ry, False), ref_picks(xu, r, y, ry, False, cosine))
    tri, ref = pair(cosine)
    ys = y[:24]  # B ≤ 25: cdist's exact (difference) mode, so the reference ties exactly
    assert_close_vg(lambda e: tri(e, ys), lambda e: ref(e, ys), x[:24])


def test_ref_emb_margins_and_reductions():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(15, 8, dtype=torch.float64, generator=g)
    r = torch.randn(26, 8, dtype=torch.float64, generator=g)
    y, ry = torch.randint(0, 4, (15,), generator=g), torch.randint(0, 4, (26,), generator=g)
    x, r, y, ry = on_dev(x, r, y, ry)
    for kw, cosine in [({}, False), ({"reduction": "sum", "margin": 1e-5}, False),
                       ({"margin": 0.5}, True), ({"reduction": "sum", "margin": 0.0}, True)]:
        tri, ref = pair(cosine, **kw)
        assert_close_vg(lambda e, f: tri(e, y, ref_emb=f, ref_labels=ry),
                        lambda e, f: ref(e, y, ref_emb=f, ref_labels=ry), x, r)
        assert_close_vg(lambda e, f: tri(e, y, ref_emb=f, ref_labels=y),
                        lambda e, f: ref(e, y, ref_emb=f, ref_labels=y), x, r[:15])


def test_fp32_and_half_inputs():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(45, 20, generator=g)
    y = torch.randint(0, 6, (45,), generator=g)
    x, y = on_dev(x, y)
    tri, ref = pair()
    v, (gx,) = value_and_grad(lambda e: tri(e, y), x)
    vr, (gr,) = value_and_grad(lambda e: ref(e, y), x.double())
    assert v.dtype == torch.float32 and gx.dtype == torch.float32
    torch.testing.assert_close(v.double(), vr, rtol=1e-4, atol=1e-7)
    assert (gx.double() - gr).abs().max().item() <= 1e-4 * gr.abs().max().item()
    for dtype, tol in ((torch.float16, 2e-3), (torch.bfloat16, 1e-2)):
        xh = x.to(dtype)
        v, (gx,) = value_and_grad(lambda e: tri(e, y), xh)
        vr, (gr,) = value_and_grad(lambda e: ref(e, y), xh.double())
        assert gx.dtype == dtype and torch.isfinite(gx).all()
        assert abs(float(v) - float(vr)) <= 5 * tol * abs(float(vr))


def test_backend_triton_runs_the_kernel(monkeypatch):
    import metrix_ops.fused.hphn_triplet as cpu_glue
    import metrix_ops.triton.hphn_triplet as th

    calls = []
    kern = th._hphn_mine_kernel

    class Spy:
        def __getitem__(self, grid):
            calls.append(grid)
            return kern[grid]

    monkeypatch.setattr(th, "_hphn_mine_kernel", Spy())

    def no_cpu(*a, **k):
        raise AssertionError("the CPU op ran")

    monkeypatch.setattr(cpu_glue, "ee_hphn_mine", no_cpu)
    x, y = on_dev(*make_case(CASES[0]))
    mo.losses.HPHNTripletLoss(backend="triton")(x, y).backward()
    assert len(calls) == 1 and x.grad is not None
    assert "HPHNTripletLoss" in mo.backend.FUSED["triton"]


def test_refuses_outside_its_scope_and_bad_input():
    x, y = on_dev(*make_case(CASES[1]))
    # EE is covered (triton/ee_hphn.py) except unnormalised synthetic points under L2
    with pytest.raises(NotImplementedError, match="does not cover"):
        mo.losses.HPHNTripletLoss(backend="triton",
                                  expansion=mo.Expansion(n_points=2, normalize=False))(x, y)
    with pytest.raises(NotImplementedError, match="does not cover"):
        mo.losses.HPHNTripletLoss(backend="triton",
                                  distance=mo.distances.LpDistance(normalize_embeddings=False))(x, y)
    tri = mo.losses.HPHNTripletLoss(backend="triton")
    with pytest.raises(ValueError, match="labels has 4 entries"):
        tri(x, y[:4])
    bad = x.detach().clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="embeddings contains NaN"):
        tri(bad, y)
    with pytest.raises(ValueError, match="exclude_diag needs r"):
        torch.ops.metrix_ops.triton_hphn_mine(x, x[:5], y, y[:5], True)


def test_opcheck_and_compile():
    x = F.normalize(torch.randn(9, 4, dtype=widest_dtype()[0]), dim=1).to(DEVICE)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3, 0], device=DEVICE)
    torch.library.opcheck(torch.ops.metrix_ops.triton_hphn_mine.default, (x, x, y, y, True),
                          test_utils=("test_schema", "test_faketensor"))
    torch._dynamo.reset()
    loss = mo.losses.HPHNTripletLoss(backend="triton")
    # hphn_terms (shared with the CPU path) branches on whether any anchor has a triplet:
    # a graph break, so not fullgraph
    compiled = torch.compile(lambda e, lab: loss(e, lab), backend="eager")
    g = torch.Generator().manual_seed(3)
    for b, k in [(13, 4), (6, 6)]:
        xx, yy = on_dev(torch.randn(b, 7, generator=g), torch.randint(0, k, (b,), generator=g))
        va, (ga,) = value_and_grad(lambda e: compiled(e, yy), xx)
        vb, (gb,) = value_and_grad(lambda e: loss(e, yy), xx)
        torch.testing.assert_close(va, vb, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6)
