"""A row of all zeros under an L2 of normalised rows. PML's LpDistance normalises it to the
zero vector, at distance 1 from every unit row (0 from another zero row); the fused ops
compute that L2 from the rows' cosine as √(2 − 2s), which gives √2 there. The driver looks for
such a row in the NaN check's read: `auto` runs the reference for that batch, an explicit
fused backend refuses. The cosine losses are exact on a zero row (cosine 0 on both sides)
and keep their engine."""
from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning import distances as pd
from pytorch_metric_learning import losses as pl

import metrix_ops as mo

L2_LOSSES = [
    ("ContrastiveLoss", {}, None),
    ("ContrastiveLoss", {"pos_margin": 0.1, "neg_margin": 1.2}, "sq"),
    ("LiftedStructureLoss", {}, None),
    ("GeneralizedLiftedStructureLoss", {"neg_margin": 0.7}, None),
    ("TripletMarginLoss", {"margin": 0.3}, None),
]


def batch(zero_rows=(0, 6), b=11, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, dtype=torch.float64, generator=g)
    x[list(zero_rows)] = 0
    y = torch.randint(0, 3, (b,), generator=g)
    return x, y


def _dist(kind, lib):
    return {} if kind is None else {"distance": lib.LpDistance(power=2)}


def _value_and_grad(fn, *tensors):
    leaves = [t.clone().requires_grad_() for t in tensors]
    v = fn(*leaves)
    v.backward()
    return v.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("name,kw,kind", L2_LOSSES)
@pytest.mark.parametrize("zero_rows", [(0,), (0, 6), (3, 4, 5)])
def test_auto_equals_pml_with_zero_rows(name, kw, kind, zero_rows):
    x, y = batch(zero_rows)
    ours = getattr(mo.losses, name)(**kw, **_dist(kind, mo.distances))
    pml = getattr(pl, name)(**kw, **_dist(kind, pd))
    v, (g,) = _value_and_grad(lambda e: ours(e, y), x)
    pv, (pg,) = _value_and_grad(lambda e: pml(e, y), x)
    torch.testing.assert_close(v, pv, rtol=1e-9, atol=1e-12)
    # the rows that are not zero (a zero row's gradient is F.normalize's 1/eps there)
    live = (x != 0).any(1)
    torch.testing.assert_close(g[live], pg[live], rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name,kw,kind", L2_LOSSES[:4])
def test_zero_row_in_ref_emb(name, kw, kind):
    x, y = batch(())
    r, ry = batch((2,), b=7, seed=1)
    ours = getattr(mo.losses, name)(**kw, **_dist(kind, mo.distances))
    pml = getattr(pl, name)(**kw, **_dist(kind, pd))
    v, (gx, gr) = _value_and_grad(lambda e, f: ours(e, y, ref_emb=f, ref_labels=ry), x, r)
    pv, (px, pr) = _value_and_grad(lambda e, f: pml(e, y, ref_emb=f, ref_labels=ry), x, r)
    torch.testing.assert_close(v, pv, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gx, px, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name,kw,kind", L2_LOSSES)
def test_explicit_fused_backend_refuses(name, kw, kind):
    x, y = batch((4,))
    loss = getattr(mo.losses, name)(backend="cpu", **kw, **_dist(kind, mo.distances))
    with pytest.raises(NotImplementedError, match="all zeros.*unit rows"):
        loss(x, y)
    x[4] = 1e-30  # under normalize's eps: normalised to a short row, refused too
    with pytest.raises(NotImplementedError, match="all zeros.*unit rows"):
        loss(x, y)
    x[4] = 1e-11  # over it: normalised to a unit row, the op's form is exact
    ref = getattr(mo.losses, name)(backend="reference", **kw, **_dist(kind, mo.distances))
    torch.testing.assert_close(loss(x, y), ref(x, y), rtol=1e-9, atol=1e-12)


def test_metrix_and_expansion_follow_the_reference():
    x, y = batch((0, 6))
    for make in (lambda b: mo.losses.ContrastiveLoss(metrix=mo.Metrix(lam=0.3), backend=b),
                 lambda b: mo.losses.GeneralizedLiftedStructureLoss(metrix=mo.Metrix(lam=0.6),
                                                                    backend=b),
                 lambda b: mo.losses.HPHNTripletLoss(expansion=mo.Expansion(n_points=2),
                                                     backend=b),
                 lambda b: mo.losses.HPHNTripletLoss(backend=b)):
        v, (g,) = _value_and_grad(lambda e: make("auto")(e, y), x)
        rv, (rg,) = _value_and_grad(lambda e: make("reference")(e, y), x)
        torch.testing.assert_close(v, rv, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(g, rg, rtol=1e-7, atol=1e-9)


def test_cosine_losses_keep_their_engine_on_zero_rows(monkeypatch):
    """MS on the cosine: a zero row is exact in the op (s = 0, as PML's cosine of a zero
    row), so the CPU engine keeps the call and matches PML."""
    x, y = batch((0, 6))
    ours = mo.losses.MultiSimilarityLoss(backend="cpu")
    v, (g,) = _value_and_grad(lambda e: ours(e, y), x)
    pv, (pg,) = _value_and_grad(lambda e: pl.MultiSimilarityLoss()(e, y), x)
    torch.testing.assert_close(v, pv, rtol=1e-9, atol=1e-12)
    live = (x != 0).any(1)
    torch.testing.assert_close(g[live], pg[live], rtol=1e-7, atol=1e-9)


def test_half_inputs_with_a_zero_row():
    x, y = batch((1,))
    loss = mo.losses.ContrastiveLoss()
    ref = pl.ContrastiveLoss()
    # half inputs are computed in fp32: PML's fp32 numbers on them (its fp64 ones differed by
    # one counted pair, 1%, on torch 2.4's fp32 distances)
    torch.testing.assert_close(loss(x.half(), y), ref(x.half().float(), y),
                               rtol=1e-5, atol=1e-6)


def test_cross_batch_memory_with_a_zero_row_in_the_bank():
    """A zero row enqueued by one step is in the bank at the next: the streaming path
    (fused.run_with_memory) is skipped while the bank may hold it, so each step equals PML's
    CrossBatchMemory."""
    from pytorch_metric_learning.losses import CrossBatchMemory as PMLXBM
    ours = mo.losses.CrossBatchMemory(mo.losses.ContrastiveLoss(), embedding_size=6,
                                      memory_size=20)
    pml = PMLXBM(pl.ContrastiveLoss(), embedding_size=6, memory_size=20)
    for step, zero in enumerate([(2,), (), ()]):
        x, y = batch(zero, b=7, seed=step)
        v, (g,) = _value_and_grad(lambda e: ours(e, y), x)
        pv, (pg,) = _value_and_grad(lambda e: pml(e, y), x)
        torch.testing.assert_close(v, pv.to(v.dtype), rtol=1e-6, atol=1e-8)
        live = (x != 0).any(1)
        torch.testing.assert_close(g[live], pg[live].to(g.dtype), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bad", ["zero", "overflow"])
def test_proxy_row_zero_or_past_the_float_range(bad):
    """ProxyNCA's proxies are normalised as the embeddings are (LpDistance, squared L2): a
    zero proxy, or one whose fp32 norm overflows (F.normalize makes it zero), sits at
    distance 1 from every row, where the op's 2 − 2s gives 2. `auto` runs the reference
    (PML's numbers), an explicit fused backend refuses; a finite proxy row elsewhere keeps
    the engine."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 5, generator=g)
    y = torch.randint(0, 4, (9,), generator=g)
    p = torch.randn(4, 5, generator=g)
    p[2] = 0 if bad == "zero" else p[2] * 1e20
    ours, pml = mo.losses.ProxyNCALoss(4, 5), pl.ProxyNCALoss(4, 5)
    ours.proxies.data.copy_(p)
    pml.proxies.data.copy_(p)
    v, (gx,) = _value_and_grad(lambda e: ours(e, y), x)
    pv, (px,) = _value_and_grad(lambda e: pml(e, y), x)
    torch.testing.assert_close(v, pv, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, px, rtol=1e-4, atol=1e-6)
    cpu = mo.losses.ProxyNCALoss(4, 5, backend="cpu")
    cpu.proxies.data.copy_(p)
    with pytest.raises(NotImplementedError, match="proxies is all zeros.*overflows"):
        cpu(x, y)
    cpu.proxies.data[2] = 1.0
    ref = mo.losses.ProxyNCALoss(4, 5, backend="reference")
    ref.proxies.data.copy_(cpu.proxies.data)
    torch.testing.assert_close(cpu(x, y), ref(x, y), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,kw,kind", L2_LOSSES[:3])
def test_rows_whose_norm_overflows(name, kw, kind):
    """Finite entries of 1e20 in fp32: the norm overflows, F.normalize makes the row zero
    (PML's numbers); the fused ops' unit rows do not. Found like a zero row: `auto` equals
    PML, an explicit fused backend refuses."""
    x, y = batch(())
    x = x.float()
    x[3] *= 1e20
    ours = getattr(mo.losses, name)(**kw, **_dist(kind, mo.distances))
    pml = getattr(pl, name)(**kw, **_dist(kind, pd))
    torch.testing.assert_close(ours(x, y), pml(x, y), rtol=1e-5, atol=1e-6)
    cpu = getattr(mo.losses, name)(backend="cpu", **kw, **_dist(kind, mo.distances))
    with pytest.raises(NotImplementedError, match="overflows"):
        cpu(x, y)
