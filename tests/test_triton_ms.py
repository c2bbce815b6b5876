"""The Triton multi-similarity kernels (backend="triton") against the reference: values and
gradients (embeddings and ref_emb) over the shared cases and odd shapes spanning several
tiles, references, reducers, dtypes, large β; routing and errors.

Without a GPU these run under TRITON_INTERPRET=1 on CPU tensors (set before metrix_ops is
imported, e.g. `TRITON_INTERPRET=1 pytest tests/test_triton_ms.py`); otherwise they are
skipped. On a CUDA machine without TRITON_INTERPRET they run the compiled kernels."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import metrix_ops as mo
from triton_cases import DEVICE, on_dev, requires_triton
from cases import CASE_IDS, CASES, assert_close_vg, make_case, value_and_grad

pytestmark = requires_triton


def pair(**kw):
    return (mo.losses.MultiSimilarityLoss(backend="triton", **kw),
            mo.losses.MultiSimilarityLoss(backend="reference", **kw))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("kw", [{}, {"alpha": 1.3, "beta": 20.0, "base": 0.3}])
def test_matches_reference_fp64(case, kw):
    x, y = on_dev(*make_case(case))
    tri, ref = pair(**kw)
    assert_close_vg(lambda e: tri(e, y), lambda e: ref(e, y), x)


# several row and column tiles (tiles of 16..32 rows), feature widths around the tile width
@pytest.mark.parametrize("b", [1, 2, 5, 17, 33, 50])
@pytest.mark.parametrize("d,classes", [(3, 2), (16, 5), (37, 11)])
def test_odd_shapes_fp64(b, d, classes):
    g = torch.Generator().manual_seed(100 * b + d)
    x = torch.randn(b, d, dtype=torch.float64, generator=g)
    y = torch.randint(0, classes, (b,), generator=g)
    x, y = on_dev(x, y)
    tri, ref = pair()
    assert_close_vg(lambda e: tri(e, y), lambda e: ref(e, y), x)


def _ref_rows(e, f, y, ry, exclude_diag, alpha=2.0, beta=50.0, base=0.5):
    from metrix_ops.reference.multi_similarity import multi_similarity_loss_dict
    from metrix_ops.spec import LossInputs
    # the op takes unit rows as given: a similarity that does not renormalise
    inp = LossInputs(e, y, None, f, y if exclude_diag else ry, exclude_diag,
                     mo.distances.CosineSimilarity(normalize_embeddings=False))
    return multi_similarity_loss_dict(inp, alpha, beta, base)["loss"]["losses"]


@pytest.mark.parametrize("b,m", [(23, 23), (40, 9), (7, 45)])
def test_rows_op_with_unequal_row_weights(b, m):
    """The op's rows weighted unequally (every g_i differs): G's row scaling in both gradient
    kernels, into x and into r."""
    from metrix_ops.triton.multi_similarity import ms_rows_triton
    g = torch.Generator().manual_seed(b + m)
    x = F.normalize(torch.randn(b, 6, dtype=torch.float64, generator=g), dim=1)
    r = F.normalize(torch.randn(m, 6, dtype=torch.float64, generator=g), dim=1)
    y, ry = torch.randint(0, 4, (b,), generator=g), torch.randint(0, 4, (m,), generator=g)
    w = torch.randn(b, dtype=torch.float64, generator=g)
    x, r, y, ry, w = on_dev(x, r, y, ry, w)
    assert_close_vg(lambda e, f: (ms_rows_triton(e, f, y, ry, False, 2.0, 50.0, 0.5) * w).sum(),
                    lambda e, f: (_ref_rows(e, f, y, ry, False) * w).sum(), x, r)
    if b == m:  # exclude_diag, and the batch against itself (one tensor passed twice)
        assert_close_vg(lambda e, f: (ms_rows_triton(e, f, y, y, True, 2.0, 50.0, 0.5) * w).sum(),
                        lambda e, f: (_ref_rows(e, f, y, y, True) * w).sum(), x, r)
        assert_close_vg(lambda e: (ms_rows_triton(e, e, y, y, True, 1.3, 20.0, 0.3) * w).sum(),
                        lambda e: (_ref_rows(e, e, y, y, True, 1.3, 20.0, 0.3) * w).sum(), x)


def test_ref_emb_and_reducers():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(15, 8, dtype=torch.float64, generator=g)
    r = torch.randn(26, 8, dtype=torch.float64, generator=g)
    y, ry = torch.randint(0, 4, (15,), generator=g), torch.randint(0, 4, (26,), generator=g)
    x, r, y, ry = on_dev(x, r, y, ry)
    for red in (None, mo.reducers.SumReducer(), mo.reducers.AvgNonZeroReducer(),
                mo.reducers.ThresholdReducer(low=0.05, high=2.0)):
        tri, ref = pair(reducer=red)
        assert_close_vg(lambda e, f: tri(e, y, ref_emb=f, ref_labels=ry),
                        lambda e, f: ref(e, y, ref_emb=f, ref_labels=ry), x, r)
        # ref_labels *is* labels: the diagonal pairs are dropped, as in-batch
        assert_close_vg(lambda e, f: tri(e, y, ref_emb=f, ref_labels=y),
                        lambda e, f: ref(e, y, ref_emb=f, ref_labels=y), x, r[:15])
    # only ref_emb needs a gradient: the dX kernel is skipped
    tri, ref = pair()
    f = r.clone().requires_grad_()
    out = tri(x, y, ref_emb=f, ref_labels=ry)
    (gr,) = torch.autograd.grad(out, f)
    f2 = r.clone().requires_grad_()
    (gr_ref,) = torch.autograd.grad(ref(x, y, ref_emb=f2, ref_labels=ry), f2)
    torch.testing.assert_close(gr, gr_ref, rtol=1e-6, atol=1e-9)


def test_batch_as_ref_emb_with_other_labels_keeps_self_pairs():
    """ref_emb=the batch but ref_labels a different tensor: PML keeps the self pairs."""
    x, y = on_dev(*make_case(CASES[1]))
    tri, ref = pair()
    v = assert_close_vg(lambda e: tri(e, y, ref_emb=e, ref_labels=y.clone()),
                        lambda e: ref(e, y, ref_emb=e, ref_labels=y.clone()), x)
    assert not torch.allclose(v, tri(x, y).detach())


def test_labels_far_apart():
    x, y = on_dev(*make_case(CASES[1]))
    big = y * (2 ** 60) + 7
    tri, ref = pair()
    assert_close_vg(lambda e: tri(e, big), lambda e: ref(e, y), x)


def test_fp32_matches_fp64_reference():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(45, 20, generator=g)
    y = torch.randint(0, 6, (45,), generator=g)
    x, y = on_dev(x, y)
    tri, ref = pair()
    v, (gx,) = value_and_grad(lambda e: tri(e, y), x)
    vr, (gr,) = value_and_grad(lambda e: ref(e, y), x.double())
    assert v.dtype == torch.float32 and gx.dtype == torch.float32
    torch.testing.assert_close(v.double(), vr, rtol=1e-4, atol=1e-7)
    scale = gr.abs().max().item()
    assert (gx.double() - gr).abs().max().item() <= 1e-4 * scale


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_half_inputs(dtype, tol):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 16, generator=g).to(dtype)
    y = torch.randint(0, 6, (40,), generator=g)
    x, y = on_dev(x, y)
    tri, ref = pair()
    v, (gx,) = value_and_grad(lambda e: tri(e, y), x)
    vr, (gr,) = value_and_grad(lambda e: ref(e, y), x.double())
    assert v.dtype == torch.float32 and gx.dtype == dtype and torch.isfinite(gx).all()
    assert abs(float(v) - float(vr)) <= tol * abs(float(vr))
    assert (gx.double() - gr).abs().max().item() <= 5 * tol * gr.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_beta_is_stable(dtype):
    """e^{β(s−base)} far past fp32's range (β = 400: e^{200}): the online max shift."""
    g = torch.Generator().manual_seed(4)
    base = torch.randn(2, 32, generator=g)
    x = base.repeat_interleave(8, 0) + 1e-3 * torch.randn(16, 32, generator=g)
    y = torch.tensor([0] * 8 + [1] * 8)
    x, y = on_dev(x.to(dtype), y)
    for kw in ({}, {"beta": 400.0, "alpha": 100.0}):
        tri, ref = pair(**kw)
        v, (gx,) = value_and_grad(lambda e: tri(e, y), x)
        vr, (gr,) = value_and_grad(lambda e: ref(e, y), x.double())
        assert torch.isfinite(v) and torch.isfinite(gx).all()
        torch.testing.assert_close(v.double(), vr, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(gx.double(), gr, rtol=1e-3, atol=1e-3 * gr.abs().max().item())


def test_backend_triton_runs_the_kernels(monkeypatch):
    """backend="triton" launches these kernels (forward and both gradient kernels), never the
    CPU op; "auto" on CUDA tensors picks triton when no CUDA op covers the loss."""
    import metrix_ops.fused.multi_similarity as cpu_glue
    import metrix_ops.triton.multi_similarity as tms

    calls = []

    def spy(name, fn):
        def wrapped(*a, **k):
            calls.append(name)
            return fn(*a, **k)
        monkeypatch.setattr(tms, name, wrapped)

    spy("ms_forward", tms.ms_forward)
    spy("ms_backward", tms.ms_backward)
    symmetric = []
    grads = tms.pair_grads

    def spy_grads(*a, **k):
        symmetric.append(a[8])
        return grads(*a, **k)

    monkeypatch.setattr(tms, "pair_grads", spy_grads)

    def no_cpu(*a, **k):
        raise AssertionError("the CPU op ran")

    monkeypatch.setattr(cpu_glue, "ms_loss_rows", no_cpu)
    monkeypatch.setattr(cpu_glue, "ms_loss_rows_self", no_cpu)
    x, y = on_dev(*make_case(CASES[0]))
    loss = mo.losses.MultiSimilarityLoss(backend="triton")
    loss(x, y).backward()
    loss(x, y, ref_emb=x.detach() + 0, ref_labels=y).backward()
    assert calls == ["ms_forward", "ms_backward"] * 2
    assert symmetric == [True, False]  # the batch against itself: one symmetric kernel
    assert "MultiSimilarityLoss" in mo.backend.FUSED["triton"]
    if DEVICE.type == "cuda" and "MultiSimilarityLoss" not in mo.backend.FUSED["cuda"]:
        assert mo.backend.resolve("auto", "MultiSimilarityLoss", DEVICE) == "triton"


def test_no_pairs_rule_is_a_select_without_a_host_read():
    """PML's no-loss rule on batches without two pairs: the reference's zero loss and
    gradient, selected on the pair counts after the op; the call's one host read is the
    NaN check (a branch on the counts would wait on the GPU)."""
    from host_reads import SyncCounter
    tri, ref = pair()
    x = torch.randn(1, 5, dtype=torch.float64, device=DEVICE)
    y = torch.zeros(1, dtype=torch.long, device=DEVICE)
    assert_close_vg(lambda e: tri(e, y), lambda e: ref(e, y), x)  # one anchor, no pair
    # one anchor against one reference of another class: a single (negative) pair
    r, ry = torch.randn(1, 5, dtype=torch.float64, device=DEVICE), y + 1
    assert_close_vg(lambda e, f: tri(e, y, ref_emb=f, ref_labels=ry),
                    lambda e, f: ref(e, y, ref_emb=f, ref_labels=ry), x, r)
    with SyncCounter() as counter:
        tri(x.clone().requires_grad_(), y).backward()
    assert [k.split()[0].split(":")[0] for k in counter.sites] == ["metrix_ops/validation.py"]
    assert counter.total == 1


def test_refuses_outside_its_scope_and_bad_input():
    x, y = on_dev(*make_case(CASES[1]))
    it = mo.miners.MultiSimilarityMiner()(x, y)
    with pytest.raises(NotImplementedError, match="does not cover this MultiSimilarityLoss call"):
        mo.losses.MultiSimilarityLoss(backend="triton")(x, y, it)
    with pytest.raises(NotImplementedError, match="does not cover"):
        mo.losses.MultiSimilarityLoss(backend="triton", distance=mo.distances.LpDistance())(x, y)
    tri = mo.losses.MultiSimilarityLoss(backend="triton")
    # an empty batch: PML's zero loss (test_empty_batch.py), on this engine's device too
    assert tri(torch.zeros(0, 5, device=DEVICE),
               torch.zeros(0, dtype=torch.long, device=DEVICE)).item() == 0.0
    with pytest.raises(ValueError, match="labels has 4 entries"):
        tri(x, y[:4])
    with pytest.raises(ValueError, match="ref_emb has embedding_dim"):
        tri(x, y, ref_emb=x[:, :3], ref_labels=y)
    bad = x.detach().clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="embeddings contains NaN"):
        tri(bad, y)


def test_plain_cpu_without_interpreter_refuses():
    code = ("import torch, metrix_ops as mo\n"
            "x = torch.randn(6, 4); y = torch.arange(6) % 2\n"
            "try:\n"
            "    mo.losses.MultiSimilarityLoss(backend='triton')(x, y)\n"
            "except ValueError as e:\n"
            "    print('REFUSED', e)\n")
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert "REFUSED backend='triton' cannot run here" in out.stdout, out.stdout + out.stderr


def test_wide_embeddings_and_the_width_limit():
    """D = 300: the gradient kernels' row tiles shrink for the 512-wide accumulators (two
    tiles of 16 rows where the forward takes one of 32); past max_dim the op refuses."""
    from metrix_ops.triton.multi_similarity import max_dim
    g = torch.Generator().manual_seed(9)
    x = torch.randn(29, 300, dtype=torch.float64, generator=g)
    r = torch.randn(21, 300, dtype=torch.float64, generator=g)
    y, ry = torch.randint(0, 3, (29,), generator=g), torch.randint(0, 3, (21,), generator=g)
    x, r, y, ry = on_dev(x, r, y, ry)
    tri, ref = pair()
    assert_close_vg(lambda e, f: tri(e, y, ref_emb=f, ref_labels=ry),
                    lambda e, f: ref(e, y, ref_emb=f, ref_labels=ry), x, r)
    assert (max_dim(torch.float32), max_dim(torch.float64)) == (2048, 1024)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):  # halves count as fp32
        wide = torch.randn(3, max_dim(dtype) + 1, device=DEVICE).to(dtype)
        with pytest.raises(NotImplementedError, match="does not cover"):
            tri(wide, torch.tensor([0, 0, 1], device=DEVICE))


def test_opcheck():
    x = F.normalize(torch.randn(11, 4, dtype=torch.float64), dim=1).to(DEVICE)
    r = F.normalize(torch.randn(7, 4, dtype=torch.float64), dim=1).to(DEVICE)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 0], device=DEVICE)
    ry = torch.tensor([0, 1, 1, 2, 3, 5, 0], device=DEVICE)
    ops = torch.ops.metrix_ops
    torch.library.opcheck(ops.triton_ms_rows.default,
                          (x.clone().requires_grad_(), r.clone().requires_grad_(), y, ry, False,
                           2.0, 50.0, 0.5, False))
    # the batch against itself, through the symmetric gradient kernel
    xs = x.clone().requires_grad_()
    torch.library.opcheck(ops.triton_ms_rows.default, (xs, xs, y, y, True, 2.0, 50.0, 0.5, True))
    lp, ln = ops.triton_ms_rows(x, x, y, y, True, 2.0, 50.0, 0.5, False)[1:]
    g = torch.randn(11, dtype=torch.float64, device=DEVICE)
    for sym, need in ((False, (True, False)), (True, (True, False))):
        torch.library.opcheck(ops.triton_ms_rows_bwd.default,
                              (g, x, x, y, y, lp, ln, True, 2.0, 50.0, 0.5, sym) + need)
