"""Every call the Triton engine fuses, in float32 against the float64 reference: each loss
clean, with its fused miner, with embedding-level Metrix and with Embedding Expansion, over
the shared random and edge cases (no positives, one class, B = 1, duplicate rows); values
and the embeddings' gradients (and the proxies' for the proxy losses). The engine's other
test files compare in float64; where triton cannot tl.dot float64 tiles (3.2 to 3.4:
launch.FP64_DOT, scripts/oldest_check.sh's triton32 preset) those skip and this file is the
engine's coverage. The spy on the engine's op table checks that its fused op ran.

Without a GPU these run under TRITON_INTERPRET=1 on CPU tensors."""
import copy

import pytest
import torch

import metrix_ops as mo
from cases import CASE_IDS, CASES, make_case
from metrix_ops import backend, fused
from triton_cases import DEVICE, on_dev, requires_triton

pytestmark = requires_triton

PROXY = {"num_classes": 7, "embedding_size": None}  # embedding_size: the case's D


def _tables(variant):
    """The op tables the driver looks the variant's op up in (EE: the loss's own op, whose
    supports() may take expansion=, or the one registered for expansion)."""
    return {"clean": [fused.IMPLS], "expansion": [fused.IMPLS, fused.EXPANSION_IMPLS],
            "metrix": [fused.METRIX_IMPLS], "miner": [fused.MINER_IMPLS]}[variant]


def _calls(variant):
    """(loss name, constructor kwargs) of every call of `variant` the engine fuses."""
    names = sorted(n for (b, n) in _tables(variant)[0] if b == "triton")
    if variant == "clean":
        return [(n, {}) for n in names]
    if variant == "miner":
        miners = {"MultiSimilarityLoss": lambda: mo.miners.MultiSimilarityMiner(0.1),
                  "TripletMarginLoss": lambda: mo.miners.TripletMarginMiner(0.1, "semihard")}
        return [(n, {"miner": miners[n]()}) for n in names if n in miners]
    if variant == "metrix":
        calls = [(n, {"metrix": mo.Metrix(lam=0.3)}) for n in names]
        return calls + [("ContrastiveLoss", {"metrix": mo.Metrix(lam=0.6, pairs="anchor_neg")})]
    # the engine's EE ops
    return [(n, {"expansion": mo.Expansion(n_points=2)}) for n in
            sorted(n for (b, n) in fused.EXPANSION_IMPLS if b == "triton")]


CALLS = [(v, n, kw) for v in ("clean", "miner", "metrix", "expansion") for n, kw in _calls(v)]


@pytest.fixture
def spy(monkeypatch):
    """The engine's ops for (variant, loss) wrapped to count their calls."""
    ran = []

    def wrap(variant, name):
        for table in _tables(variant):
            if ("triton", name) in table:
                supports, impl = table[("triton", name)]
                monkeypatch.setitem(table, ("triton", name),
                                    (supports, lambda *a, f=impl, **k: ran.append(1) or f(*a, **k)))
        return ran
    return wrap


def _value_and_grads(loss, x, y):
    x = x.detach().clone().requires_grad_(True)
    params = [p for p in loss.parameters()]
    v = loss(x, y)
    grads = torch.autograd.grad(v, [x] + params, allow_unused=True) if v.requires_grad else \
        [None] * (1 + len(params))
    return v.detach(), [torch.zeros_like(t) if g is None else g
                        for t, g in zip([x] + params, grads)]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("variant,name,kw", CALLS,
                         ids=[f"{v}-{n}-{i}" for i, (v, n, _) in enumerate(CALLS)])
def test_float32_matches_float64_reference(variant, name, kw, case, spy):
    x, y = make_case(case, torch.float32, seed=5)
    if "Proxy" in name:
        kw = dict(kw, num_classes=PROXY["num_classes"], embedding_size=x.shape[1])
        y = y % PROXY["num_classes"]
    x, y = on_dev(x.detach(), y)
    ours = getattr(mo.losses, name)(backend="triton", **kw).to(DEVICE)
    ref = copy.deepcopy(ours).double()  # the same proxies, in float64
    ref.backend = "reference"
    ran = spy(variant, name)
    v, grads = _value_and_grads(ours, x, y)
    assert ran, f"the Triton engine's {variant} op for {name} did not run"
    vr, grads_r = _value_and_grads(ref, x.double(), y)
    assert v.dtype == torch.float32
    torch.testing.assert_close(v.double(), vr, rtol=1e-4, atol=1e-6)
    for g, gr in zip(grads, grads_r):
        torch.testing.assert_close(g.double(), gr, rtol=1e-4, atol=1e-4 * gr.abs().max() + 1e-7)


def test_every_loss_the_engine_fuses_is_swept():
    assert {n for v, n, _ in CALLS if v == "clean"} == backend.FUSED["triton"]
    # a new fused miner: add it to _calls' miners
    assert {n for v, n, _ in CALLS if v == "miner"} == \
        {n for (b, n) in fused.MINER_IMPLS if b == "triton"}
    assert {n for v, n, _ in CALLS if v == "expansion"} == \
        {"GeneralizedLiftedStructureLoss", "HPHNTripletLoss", "LiftedStructureLoss",
         "MultiSimilarityLoss", "NPairsLoss", "TripletMarginLoss"}  # as the README's table
