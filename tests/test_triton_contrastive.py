"""The Triton contrastive kernels (backend="triton") against the reference and PML: values and
gradients (embeddings and ref_emb) over the shared cases, odd shapes spanning several tiles,
margins, both distances, reducers, references, duplicates, dtypes; routing and errors.

Without a GPU these run under TRITON_INTERPRET=1 on CPU tensors (set before metrix_ops is
imported); otherwise they are skipped. On a CUDA machine without TRITON_INTERPRET they run
the compiled kernels."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import metrix_ops as mo
from triton_cases import DEVICE, on_dev, requires_triton
from cases import CASE_IDS, CASES, assert_close_vg, make_case, pml_pair, value_and_grad

pytestmark = requires_triton

MARGINS = [{}, {"pos_margin": 0.1, "neg_margin": 0.5},
           {"distance": mo.distances.CosineSimilarity(), "pos_margin": 0.6, "neg_margin": 0.1}]


def pair(**kw):
    return (mo.losses.ContrastiveLoss(backend="triton", **kw),
            mo.losses.ContrastiveLoss(backend="reference", **kw))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("kw", MARGINS, ids=["default", "margins", "cosine"])
def test_matches_reference_fp64(case, kw):
    x, y = on_dev(*make_case(case))
    tri, ref = pair(**kw)
    assert_close_vg(lambda e: tri(e, y), lambda e: ref(e, y), x)


@pytest.mark.parametrize("b", [1, 2, 5, 17, 33, 50])
@pytest.mark.parametrize("d,classes", [(3, 2), (37, 11)])
def test_odd_shapes_fp64(b, d, classes):
    g = torch.Generator().manual_seed(100 * b + d)
    x = torch.randn(b, d, dtype=torch.float64, generator=g)
    y = torch.randint(0, classes, (b,), generator=g)
    x, y = on_dev(x, y)
    tri, ref = pair(neg_margin=1.2)
    assert_close_vg(lambda e: tri(e, y), lambda e: ref(e, y), x)


@pytest.mark.parametrize("reducer", ["AvgNonZeroReducer", "MeanReducer", "SumReducer"])
@pytest.mark.parametrize("dist", ["LpDistance", "CosineSimilarity"])
def test_reducers_and_distances_match_pml(reducer, dist):
    from pytorch_metric_learning import distances as pd
    cos = dist == "CosineSimilarity"
    kw = {"pos_margin": 0.7, "neg_margin": 0.2} if cos else {"neg_margin": 1.1}
    _, pml = pml_pair("ContrastiveLoss", kw, dist=getattr(pd, dist), reducer=reducer)
    tri = mo.losses.ContrastiveLoss(backend="triton", distance=getattr(pd, dist)(),
                                    reducer=getattr(mo.reducers, reducer)(), **kw)
    for case in (CASES[1], CASES[7]):
        x, y = make_case(case, seed=2)
        if DEVICE.type == "cuda":  # PML on the CPU copy, ours on the device
            v, (gx,) = value_and_grad(lambda e: tri(e.to(DEVICE), y.to(DEVICE)), x)
            vp, (gp,) = value_and_grad(lambda e: pml(e, y), x)
            torch.testing.assert_close(v.cpu(), vp, rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(gx.cpu(), gp, rtol=1e-6, atol=1e-9)
        else:
            assert_close_vg(lambda e: tri(e, y), lambda e: pml(e, y), x)


@pytest.mark.parametrize("low,high", [(0.1, None), (None, 0.6), (0.2, 0.9), (5.0, None)])
def test_threshold_reducer(low, high):
    x, y = on_dev(*make_case(CASES[1], seed=3))
    tri, ref = pair(reducer=mo.reducers.ThresholdReducer(low=low, high=high))
    assert_close_vg(lambda e: tri(e, y), lambda e: ref(e, y), x)


def test_ref_emb_and_ref_labels():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(15, 8, dtype=torch.float64, generator=g)
    r = torch.randn(26, 8, dtype=torch.float64, generator=g)
    y, ry = torch.randint(0, 4, (15,), generator=g), torch.randint(0, 4, (26,), generator=g)
    x, r, y, ry = on_dev(x, r, y, ry)
    for kw in MARGINS:
        for red in (None, mo.reducers.MeanReducer(), mo.reducers.SumReducer()):
            tri, ref = pair(reducer=red, **kw)
            assert_close_vg(lambda e, f: tri(e, y, ref_emb=f, ref_labels=ry),
                            lambda e, f: ref(e, y, ref_emb=f, ref_labels=ry), x, r)
            # ref_labels *is* labels: the diagonal pairs are dropped, as in-batch
            assert_close_vg(lambda e, f: tri(e, y, ref_emb=f, ref_labels=y),
                            lambda e, f: ref(e, y, ref_emb=f, ref_labels=y), x, r[:15])
    # ref_emb *is* the batch but ref_labels another tensor: PML keeps the self pairs, which
    # a negative pos_margin makes count
    tri, ref = pair(pos_margin=-0.1)
    assert_close_vg(lambda e: tri(e, y, ref_emb=e, ref_labels=y.clone()),
                    lambda e: ref(e, y, ref_emb=e, ref_labels=y.clone()), x)
    # only ref_emb needs a gradient: the dX kernel is skipped
    tri, ref = pair()
    f1, f2 = r.clone().requires_grad_(), r.clone().requires_grad_()
    (g1,) = torch.autograd.grad(tri(x, y, ref_emb=f1, ref_labels=ry), f1)
    (g2,) = torch.autograd.grad(ref(x, y, ref_emb=f2, ref_labels=ry), f2)
    torch.testing.assert_close(g1, g2, rtol=1e-6, atol=1e-9)


def _dense_rows(xu, ru, y, ry, exclude_diag, cosine, pm, nm, low, high):
    """Per-row (pos_sum, pos_cnt, neg_sum, neg_cnt) from the whole S."""
    s = xu @ ru.t()
    pos = y[:, None] == ry[None, :]
    valid = torch.ones_like(pos)
    if exclude_diag:
        valid.fill_diagonal_(False)
    if cosine:
        tp, tn = F.relu(pm - s), F.relu(s - nm)
    else:
        d = torch.sqrt(torch.clamp(2 - 2 * s, min=1e-30))  # no pair here has d near 0
        tp, tn = F.relu(d - pm), F.relu(nm - d)
    out = []
    for t, side in ((tp, pos & valid), (tn, ~pos & valid)):
        keep = side & (t > low) & (t < high)
        out += [(t * keep).sum(1), keep.sum(1)]
    return out


@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("b,m", [(37, 37), (40, 9), (7, 45)])
def test_rows_op_counts_and_unequal_weights(cosine, b, m):
    """Counts exactly; sums with unequal row weights on both sides (every g±_i differs), into
    x and into r, with a window that drops terms at both ends."""
    from metrix_ops.triton.contrastive import contrastive_rows_triton
    g = torch.Generator().manual_seed(b + m + cosine)
    x = F.normalize(torch.randn(b, 6, dtype=torch.float64, generator=g), dim=1)
    r = F.normalize(torch.randn(m, 6, dtype=torch.float64, generator=g), dim=1)
    y, ry = torch.randint(0, 5, (b,), generator=g), torch.randint(0, 5, (m,), generator=g)
    w = torch.randn(2, b, dtype=torch.float64, generator=g)
    x, r, y, ry, w = on_dev(x, r, y, ry, w)
    pm, nm, low, high = (0.4, 0.1, 0.02, 0.9) if cosine else (0.3, 1.2, 0.0, 1.0)

    def weighted(rows):
        assert rows[1].dtype == torch.long and rows[3].dtype == torch.long
        return (rows[0] * w[0]).sum() + (rows[2] * w[1]).sum(), rows[1], rows[3]

    for excl in ((False, True) if b == m else (False,)):
        ry_ = y if excl else ry

        def tri(e, f):
            return weighted(contrastive_rows_triton(e, f, y, ry_, excl, cosine, pm, nm, low, high))

        def dense(e, f):
            return weighted(_dense_rows(e, f, y, ry_, excl, cosine, pm, nm, low, high))

        got, want = tri(x, r), dense(x, r)
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
        torch.testing.assert_close(got[2], want[2], rtol=0, atol=0)
        assert_close_vg(lambda e, f: tri(e, f)[0], lambda e, f: dense(e, f)[0], x, r)
        if excl:  # the batch against itself: one tensor passed twice
            assert_close_vg(lambda e: tri(e, e)[0], lambda e: dense(e, e)[0], x)


def test_one_side_unused_gets_no_gradient_from_it():
    """Only the positive sums used: the negative side's row gradient arrives as None."""
    from metrix_ops.triton.contrastive import contrastive_rows_triton
    x = F.normalize(torch.randn(12, 5, dtype=torch.float64), dim=1).to(DEVICE)
    y = (torch.arange(12) % 3).to(DEVICE)
    assert_close_vg(
        lambda e: contrastive_rows_triton(e, e, y, y, True, False, 0.1, 1.0)[0].sum(),
        lambda e: _dense_rows(e, e, y, y, True, False, 0.1, 1.0, -1.0, 9.0)[0].sum(), x)


def test_duplicates_have_finite_zero_gradient_and_match_pml():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(40, 8, dtype=torch.float64, generator=g)
    y = torch.randint(0, 4, (40,), generator=g)
    x[10:20] = x[0]  # ten copies of one row, some positives, some negatives of it
    y[10:15] = y[0]
    kw = {"pos_margin": 0.05, "neg_margin": 0.8}
    _, pml = pml_pair("ContrastiveLoss", kw)
    tri = mo.losses.ContrastiveLoss(backend="triton", **kw)
    v, (gx,) = value_and_grad(lambda e: tri(e.to(DEVICE), y.to(DEVICE)), x)
    vp, (gp,) = value_and_grad(lambda e: pml(e, y), x)
    torch.testing.assert_close(v.cpu(), vp, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(gx.cpu(), gp, rtol=1e-6, atol=1e-9)
    x32 = x.float().to(DEVICE).requires_grad_()
    out = tri(x32, y.to(DEVICE))
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(x32.grad).all()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 1e-4),
                                       (torch.bfloat16, 1e-4)])
def test_low_precision_inputs(dtype, tol):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(40, 16, generator=g).to(dtype)
    y = torch.randint(0, 6, (40,), generator=g)
    x, y = on_dev(x, y)
    tri, ref = pair(neg_margin=1.1)
    # the same (rounded) inputs in fp64 on the reference: the op computes in fp32
    vr, (gr,) = value_and_grad(lambda e: ref(e, y), x.double())
    v, (gx,) = value_and_grad(lambda e: tri(e, y), x)
    assert v.dtype == torch.float32 and gx.dtype == dtype
    torch.testing.assert_close(v.double(), vr, rtol=tol, atol=1e-6)
    torch.testing.assert_close(gx.double(), gr.to(dtype).double(), rtol=2e-2, atol=1e-3)


def test_backend_triton_runs_the_kernels(monkeypatch):
    import metrix_ops.fused.contrastive as cpu_glue
    import metrix_ops.triton.contrastive as tc

    calls = []

    def spy(name, fn):
        def wrapped(*a, **k):
            calls.append(name)
            return fn(*a, **k)
        monkeypatch.setattr(tc, name, wrapped)

    spy("_con_forward", tc._con_forward)
    spy("_con_backward", tc._con_backward)
    symmetric = []
    grads = tc.pair_grads

    def spy_grads(*a, **k):
        symmetric.append(a[8])
        return grads(*a, **k)

    monkeypatch.setattr(tc, "pair_grads", spy_grads)

    def no_cpu(*a, **k):
        raise AssertionError("the CPU op ran")

    monkeypatch.setattr(cpu_glue, "contrastive_rows", no_cpu)
    monkeypatch.setattr(cpu_glue, "contrastive_rows_self", no_cpu)
    x, y = on_dev(*make_case(CASES[0]))
    for kw in MARGINS[::2]:
        calls.clear()
        symmetric.clear()
        loss = mo.losses.ContrastiveLoss(backend="triton", **kw)
        loss(x, y).backward()
        loss(x, y, ref_emb=x.detach() + 0, ref_labels=y).backward()
        assert calls == ["_con_forward", "_con_backward"] * 2
        assert symmetric == [True, False]  # the batch against itself: one symmetric kernel
    assert "ContrastiveLoss" in mo.backend.FUSED["triton"]


def test_no_pairs_rule_is_a_select_without_a_host_read():
    """PML's no-loss rule on batches without two pairs: the reference's zero loss and
    gradient, selected on the pair counts after the op; the call's one host read is the
    NaN check (a branch on the counts would wait on the GPU)."""
    from host_reads import SyncCounter
    tri, ref = pair()
    x = torch.randn(1, 5, dtype=torch.float64, device=DEVICE)
    y = torch.zeros(1, dtype=torch.long, device=DEVICE)
    assert_close_vg(lambda e: tri(e, y), lambda e: ref(e, y), x)
    r, ry = torch.randn(1, 5, dtype=torch.float64, device=DEVICE), y + 1
    assert_close_vg(lambda e, f: tri(e, y, ref_emb=f, ref_labels=ry),
                    lambda e, f: ref(e, y, ref_emb=f, ref_labels=ry), x, r)
    with SyncCounter() as counter:
        tri(x.clone().requires_grad_(), y).backward()
    assert [k.split()[0].split(":")[0] for k in counter.sites] == ["metrix_ops/validation.py"]
    assert counter.total == 1


def test_routes_refuses_and_bad_input():
    x, y = on_dev(*make_case(CASES[1]))
    it = mo.miners.MultiSimilarityMiner()(x, y)
    tri = mo.losses.ContrastiveLoss(backend="triton")
    with pytest.raises(NotImplementedError, match="does not cover this ContrastiveLoss call"):
        tri(x, y, it)
    with pytest.raises(NotImplementedError, match="does not cover"):
        mo.losses.ContrastiveLoss(backend="triton", distance=mo.distances.LpDistance(p=1))(x, y)
    # a reducer that is not a ratio of totals runs on the reference: same error as there
    with pytest.raises(ValueError, match="divisor"):
        mo.losses.ContrastiveLoss(backend="triton", reducer=mo.reducers.DivisorReducer())(x, y)
    # an empty batch: PML's zero loss (test_empty_batch.py), on this engine's device too
    assert tri(torch.zeros(0, 5, device=DEVICE),
               torch.zeros(0, dtype=torch.long, device=DEVICE)).item() == 0.0
    with pytest.raises(ValueError, match="labels has 4 entries"):
        tri(x, y[:4])
    with pytest.raises(ValueError, match="ref_labels"):
        tri(x, y, ref_emb=x, ref_labels=y[:3])


def test_plain_cpu_without_interpreter_refuses():
    code = ("import torch, metrix_ops as mo\n"
            "x = torch.randn(6, 4); y = torch.arange(6) % 2\n"
            "try:\n"
            "    mo.losses.ContrastiveLoss(backend='triton')(x, y)\n"
            "except ValueError as e:\n"
            "    print('REFUSED', e)\n")
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert "REFUSED backend='triton' cannot run here" in out.stdout, out.stdout + out.stderr


def test_opcheck():
    import math
    x = F.normalize(torch.randn(11, 4, dtype=torch.float64), dim=1).to(DEVICE)
    r = F.normalize(torch.randn(7, 4, dtype=torch.float64), dim=1).to(DEVICE)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 0], device=DEVICE)
    ry = torch.tensor([0, 1, 1, 2, 3, 5, 0], device=DEVICE)
    ops = torch.ops.metrix_ops
    common = (False, 0.1, 0.9, 0.0, math.inf)
    torch.library.opcheck(ops.triton_contrastive_rows.default,
                          (x.clone().requires_grad_(), r.clone().requires_grad_(), y, ry, False,
                           False) + common)
    xs = x.clone().requires_grad_()  # the batch against itself: the symmetric kernel
    torch.library.opcheck(ops.triton_contrastive_rows.default, (xs, xs, y, y, True, True) + common)
    g = torch.randn(2, 11, dtype=torch.float64, device=DEVICE)
    for sym, need in ((False, (True, True)), (True, (True, False))):
        torch.library.opcheck(ops.triton_contrastive_rows_bwd.default,
                              (g[0], g[1], x, x, y, y, True, sym) + common + (False,) + need)
