"""Random inputs of odd shapes and the edge cases every loss is tested on, and the
value-and-gradient comparison used against PML and between backends."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# (case id, batch size, dim, label maker(B, generator)) — odd sizes on purpose
def _rand_labels(k):
    return lambda b, g: torch.randint(0, k, (b,), generator=g)


CASES = [
    ("random_b13_d7", 13, 7, _rand_labels(4)),
    ("random_b31_d16", 31, 16, _rand_labels(6)),
    ("random_b5_d3", 5, 3, _rand_labels(2)),
    ("no_positives", 9, 5, lambda b, g: torch.arange(b)),
    ("one_class", 7, 6, lambda b, g: torch.zeros(b, dtype=torch.long)),
    ("b1", 1, 4, lambda b, g: torch.zeros(b, dtype=torch.long)),
    ("singletons_mixed", 11, 5, lambda b, g: torch.tensor([0, 0, 1, 2, 3, 3, 3, 4, 5, 6, 6])),
    ("duplicates", 10, 6, _rand_labels(3)),  # rows duplicated below
]
CASE_IDS = [c[0] for c in CASES]


def make_case(case, dtype=torch.float64, seed=0):
    name, b, d, lab = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    labels = lab(b, g)
    if name == "duplicates":
        x[1] = x[0]
        x[5] = x[3]
        labels[1] = labels[0]
        labels[5] = (labels[3] + 1) % 3  # a duplicate that is a negative
    return x.to(dtype).requires_grad_(True), labels


def value_and_grad(fn, *tensors):
    """fn(*tensors) -> scalar; returns (value, grads) with grads None-safe (zeros)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, allow_unused=True) if out.requires_grad else [None] * len(leaves)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]
    return out.detach(), grads


# assert_close_vg's grad_atol_of_max for a fused op against the reference in one dtype: 0 in
# float64; in float32 3e-5 of the largest entry (the two sides' products round apart, and a
# loss's scale, Circle's γ = 80 or MS's β = 50, carries that into every entry of G·X)
FP32_GRAD = {torch.float64: 0.0, torch.float32: 3e-5}


def assert_close_vg(fn_a, fn_b, *tensors, rtol=1e-6, atol=1e-9, grad_atol_of_max=0.0):
    """Values and gradients of fn_a and fn_b close. grad_atol_of_max adds that fraction of the
    largest |gradient entry| of fn_b to the gradients' atol: a gradient is a sum of terms as
    large as the largest entry (G·X with a loss's scale, Circle's γ = 80), so the rounding of
    its small entries scales with the large ones, not with the entry itself."""
    va, ga = value_and_grad(fn_a, *tensors)
    vb, gb = value_and_grad(fn_b, *tensors)
    assert torch.isfinite(va).all() == torch.isfinite(vb).all(), (va, vb)
    torch.testing.assert_close(va, vb, rtol=rtol, atol=atol, equal_nan=True)
    for k, (x, y) in enumerate(zip(ga, gb)):
        scale = (float(torch.nan_to_num(y.detach().abs(), nan=0.0, posinf=0.0).max())
                 if y.numel() and grad_atol_of_max else 0.0)
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol + grad_atol_of_max * scale,
                                   equal_nan=True,
                                   msg=lambda m, k=k: f"gradient of input {k}: {m}")
    return va


def assert_float32_and_bf16(fn, ref_fn, x, rtol=1e-4, atol=1e-5):
    """fn (a fused loss of the embeddings) in fp32 against ref_fn in float64, values and
    gradients; then on bf16 embeddings: an fp32 loss, a finite gradient, and the value of
    ref_fn on the same (rounded) embeddings in fp32."""
    assert_close_vg(lambda e: fn(e.float()).double(), ref_fn, x, rtol=1e-4, atol=1e-6)
    h = x.detach().to(torch.bfloat16).requires_grad_()
    v = fn(h)
    v.backward()
    assert v.dtype == torch.float32 and torch.isfinite(h.grad.float()).all()
    torch.testing.assert_close(v, ref_fn(h.detach().float()), rtol=rtol, atol=atol)


def pml_pair(name, kw=None, dist=None, reducer=None):
    """(ours on the reference backend, PML's) for loss class `name`, built with the same
    hyper-parameters, distance (a constructor of PML's) and reducer (a class name)."""
    from pytorch_metric_learning import losses as pl
    from pytorch_metric_learning import reducers as pr

    import metrix_ops as mo

    kw = dict(kw or {})
    if dist is not None:
        kw["distance"] = dist()
    if reducer is not None:
        kw["reducer"] = getattr(pr, reducer)()
    return getattr(mo.losses, name)(backend="reference", **kw), getattr(pl, name)(**kw)


def check_tuple_loss_on_cuda(backend: str, name: str, miner: str):
    """A loss over a miner's indices_tuple on CUDA tensors (a GPU engine's listed-pairs path)
    against the reference; miner "ms" (MultiSimilarityMiner) or "tm" (semihard triplets)."""
    import metrix_ops as mo
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 12, dtype=torch.float64, generator=g).cuda()
    y = torch.randint(0, 5, (40,), generator=g).cuda()
    m = (mo.miners.MultiSimilarityMiner(0.1) if miner == "ms"
         else mo.miners.TripletMarginMiner(0.2, "semihard"))
    t = m(x, y)
    ours = getattr(mo.losses, name)(backend=backend)
    ref = getattr(mo.losses, name)(backend="reference")
    assert_close_vg(lambda e: ours(e, y, t), lambda e: ref(e, y, t), x)


OWN_ROWS_LOSSES = ["MultiSimilarityLoss", "ContrastiveLoss", "TripletMarginLoss", "CircleLoss",
                   "NTXentLoss"]


def check_own_rows_with_gradient(backend, dev, name):
    """fused.run_with_memory with references whose first rows are the batch itself (the
    distributed wrapper's efficient mode: the gathered set, own rows first, row i skipping
    column i): the gradient reaches the batch through both sides, as PML's pair list gives
    it on the reference backend. `dev` moves the test tensors to the engine's device."""
    import metrix_ops as mo
    from metrix_ops import fused
    from metrix_ops.reference.pairs import all_pairs
    g = torch.Generator().manual_seed(13)
    x, y = dev(torch.randn(9, 5, generator=g, dtype=torch.float64),
               torch.randint(0, 3, (9,), generator=g))
    other, yo = dev(torch.randn(8, 5, generator=g, dtype=torch.float64),
                    torch.randint(0, 3, (8,), generator=g))
    loss, ref = (getattr(mo.losses, name)(backend=b) for b in (backend, "reference"))
    y_all = torch.cat([y, yo])
    v, (gx,) = value_and_grad(
        lambda e: fused.run_with_memory(loss, e, y, torch.cat([e, other]), y_all, 0), x)
    vr, (gr,) = value_and_grad(
        lambda e: ref(e, y, all_pairs(y, y_all, same_set=True), torch.cat([e, other]), y_all), x)
    torch.testing.assert_close(v, vr, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(gx, gr, rtol=1e-6, atol=1e-9)


class MetrixOpCalls(TorchDispatchMode):
    """Records the metrix_ops ops a call reaches, with the device of their first argument:
    `with MetrixOpCalls() as seen: ...`, then seen.calls. The Triton engine's ops
    (triton_*), which the CUDA glue takes for helpers where Triton runs on the device
    (unit_rows, HPHN's pick similarities), are left out: the engine's own ops only."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "metrix_ops" and not func.__name__.startswith("triton_"):
            self.calls.append((func.__name__.split(".")[0], args[0].device.type))
        return func(*args, **(kwargs or {}))


def listed_pairs(labels, g, negatives):
    """An indices_tuple (a1, p, a2, n): every positive pair of the batch and `negatives` of
    its negative pairs drawn by g."""
    same = labels[:, None] == labels[None, :]
    same.fill_diagonal_(False)
    a1, p = same.nonzero(as_tuple=True)
    a2, n = (~same & ~torch.eye(len(labels), dtype=torch.bool)).nonzero(as_tuple=True)
    keep = torch.randperm(len(a2), generator=g)[:negatives]
    return a1, p, a2[keep], n[keep]


def assert_same_run(what, got, want, rtol=None):
    """A run's (value, gradients) against another run's: the same bits, or with rtol (float
    atomics, whose order changes their sums' rounding) the same to rtol of each tensor's
    largest entry."""
    (v, grads), (v0, grads0) = got, want
    for k, (a, b) in enumerate([(v, v0)] + list(zip(grads, grads0))):
        name = "value" if k == 0 else f"gradient {k - 1}"
        if rtol is not None:
            torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * float(b.abs().max()),
                                       msg=lambda m, n=name: f"{what}: {n}: {m}")
        else:
            assert torch.equal(a, b), (f"{what}: {name} off by up to "
                                       f"{(a - b).abs().max().item():.3g}")
