"""backend="auto": the order of the fused engines per loss (backend.GPU_ORDER, from the GPU
measurements), and the driver taking the next engine in that order when the preferred one
does not cover a call's options. Run on the CPU with the CPU op and the Triton engine (under
TRITON_INTERPRET=1) standing in for the two GPU engines."""
import pytest
import torch

import metrix_ops as mo
import metrix_ops.triton as mt
from metrix_ops import backend, fused


def test_auto_order_follows_gpu_order_and_skips_engines_without_the_loss(monkeypatch):
    dev = torch.device("cuda")  # a device object only: nothing runs on it
    monkeypatch.setattr(backend, "_available", lambda b: True)
    monkeypatch.setattr(backend, "_device_ok", lambda b, d, dtype=None: True)
    for b in ("cuda", "triton"):  # as on a GPU build, whichever engines this build registered
        monkeypatch.setitem(backend.FUSED, b, backend.FUSED[b] | {"MultiSimilarityLoss"})
    monkeypatch.setitem(backend.GPU_ORDER, "MultiSimilarityLoss",
                        ((None, ("cuda", "triton")),))
    assert backend.auto_order("MultiSimilarityLoss", dev) == ["cuda", "triton"]
    assert backend.resolve("auto", "MultiSimilarityLoss", dev) == "cuda"
    monkeypatch.setitem(backend.GPU_ORDER, "MultiSimilarityLoss",
                        ((None, ("triton", "cuda")),))
    assert backend.resolve("auto", "MultiSimilarityLoss", dev) == "triton"
    # an engine that does not implement the loss is not in the order at all
    monkeypatch.setitem(backend.FUSED, "cuda", backend.FUSED["cuda"] - {"MultiSimilarityLoss"})
    assert backend.auto_order("MultiSimilarityLoss", dev) == ["triton"]
    # unmeasured losses: Triton first
    assert backend.GPU_DEFAULT_ORDER[0] == "triton"
    assert backend.auto_order("NoSuchLoss", dev) == []
    assert backend.resolve("auto", "NoSuchLoss", dev) == "reference"


def test_mined_and_metrix_calls_keep_triton_first_until_measured(monkeypatch):
    """miner= or Metrix on CUDA tensors: GPU_MINER_ORDER / GPU_METRIX_ORDER, not the clean
    loss's measured order (the CUDA engine's mined and Metrix MS have not run on a GPU)."""
    dev = torch.device("cuda")
    monkeypatch.setattr(backend, "_available", lambda b: True)
    monkeypatch.setattr(backend, "_device_ok", lambda b, d, dtype=None: True)
    for b in ("cuda", "triton"):
        monkeypatch.setitem(backend.FUSED, b, backend.FUSED[b] | {"MultiSimilarityLoss"})
    assert backend.auto_order("MultiSimilarityLoss", dev)[0] == "cuda"
    for variant, table in (("miner", backend.GPU_MINER_ORDER),
                           ("metrix", backend.GPU_METRIX_ORDER),
                           ("expansion", backend.GPU_EXPANSION_ORDER)):
        assert backend.auto_order("MultiSimilarityLoss", dev, variant) == ["triton", "cuda"]
        monkeypatch.setitem(table, "MultiSimilarityLoss", ((None, ("cuda", "triton")),))
        assert backend.auto_order("MultiSimilarityLoss", dev, variant) == ["cuda", "triton"]
        # CPU tensors: the CPU engine either way
        assert backend.auto_order("MultiSimilarityLoss", torch.device("cpu"), variant) == ["cpu"]


def test_under_compile_auto_tries_triton_last_for_ee(monkeypatch):
    """Triton's EE kernels take classes of at most 64 rows, which a compiled graph cannot
    check: under torch.compile "auto" puts the CUDA engine (no such limit) first for those
    calls; the clean, mined and Metrix calls (Metrix cuts larger classes into blocks) keep
    their order; eagerly nothing changes."""
    dev = torch.device("cuda")
    monkeypatch.setattr(backend, "_available", lambda b: True)
    monkeypatch.setattr(backend, "_device_ok", lambda b, d, dtype=None: True)
    for b in ("cuda", "triton"):
        monkeypatch.setitem(backend.FUSED, b, backend.FUSED[b] | {"ProxyAnchorLoss"})

    def orders():
        return {v: backend.auto_order("ProxyAnchorLoss", dev, v) for v in backend.VARIANTS}
    eager = orders()
    assert eager["metrix"][0] == eager["expansion"][0] == eager["clean"][0] == "triton"
    compiled = torch.compile(orders, fullgraph=True, backend="eager")()
    assert compiled["expansion"] == ["cuda", "triton"]
    for v in ("clean", "miner", "metrix"):
        assert compiled[v] == eager[v]


def test_measured_order_prefers_cuda_for_ms_and_triton_for_proxy_anchor():
    # the H200 figures (benchmarks/results/h200_*.json) gpu_order.json was derived from
    for b in (None, 1024, 8192, 65536):
        assert backend.order_for(backend.GPU_ORDER["MultiSimilarityLoss"], b)[0] == "cuda"
        assert backend.order_for(backend.GPU_ORDER["ProxyAnchorLoss"], b)[0] == "triton"


def test_the_shipped_order_is_the_one_the_results_give(tmp_path):
    """metrix_ops/gpu_order.json is derive_gpu_order.py's output for the results it lists."""
    import json
    import os
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "benchmarks"))
    from derive_gpu_order import main
    with open(os.path.join(root, "metrix_ops", "gpu_order.json")) as f:
        shipped = json.load(f)
    out = tmp_path / "order.json"
    main([os.path.join(root, p) for p in shipped["files"]] + ["--out", str(out)])
    assert json.loads(out.read_text())["orders"] == shipped["orders"]


def test_auto_order_changes_with_the_batch_size(monkeypatch):
    dev = torch.device("cuda")
    monkeypatch.setattr(backend, "_available", lambda b: True)
    monkeypatch.setattr(backend, "_device_ok", lambda b, d, dtype=None: True)
    for b in ("cuda", "triton"):
        monkeypatch.setitem(backend.FUSED, b, backend.FUSED[b] | {"MultiSimilarityLoss"})
    monkeypatch.setitem(backend.GPU_ORDER, "MultiSimilarityLoss",
                        ((4096, ("triton", "cuda")), (None, ("cuda", "triton"))))
    assert backend.auto_order("MultiSimilarityLoss", dev, batch=4096)[0] == "triton"
    assert backend.auto_order("MultiSimilarityLoss", dev, batch=4097)[0] == "cuda"
    assert backend.auto_order("MultiSimilarityLoss", dev)[0] == "triton"  # size unknown: first


def _result(loss, case, b, cuda, triton, d=512):
    cell = (lambda t: {"median_s": t} if isinstance(t, float) else {"error": "NotImplementedError"})
    return {"loss": loss, "case": case, "B": b, "D": d, "cuda": cell(cuda),
            "triton": cell(triton)}


def test_derive_ranks_by_summed_time_and_merges_sizes():
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                    "benchmarks"))
    from derive_gpu_order import derive
    ms = "MultiSimilarityLoss"
    res = {"machine": {"device": "GPU X"}, "command": "bench --loss multi_similarity",
           "results": [
               _result(ms, "multi_similarity", 1024, 2.0, 1.0),
               _result(ms, "multi_similarity", 2048, 3.0, 1.0, d=128),
               _result(ms, "multi_similarity", 2048, 1.0, 2.0),  # summed: triton 3 < cuda 4
               _result(ms, "multi_similarity", 8192, 1.0, 5.0),
               _result(ms, "multi_similarity", 65536, 1.0, 9.0),
               _result(ms, "metrix_ms", 8192, 4.0, 2.0),
               _result(ms, "metrix_ms_refs", 8192, 1.0, 9.0),  # another routing: left out
               _result(ms, "ms_miner", 8192, 1.0, "none"),  # triton failed: after cuda
               _result("HPHNTripletLoss", "ee_hphn", 8192, "none", "none")]}  # nothing measured
    t = derive([res])
    assert t["devices"] == ["GPU X"]
    assert t["orders"]["clean"][ms] == [
        {"max_b": 4096, "order": ["triton", "cuda"]},  # √(2048·8192)
        {"max_b": None, "order": ["cuda", "triton"]}]
    assert t["orders"]["metrix"][ms] == [{"max_b": None, "order": ["triton", "cuda"]}]
    assert t["orders"]["miner"][ms] == [{"max_b": None, "order": ["cuda", "triton"]}]
    assert "expansion" not in t["orders"]


@pytest.mark.skipif(not mt.usable_on(torch.device("cpu")),
                    reason="needs TRITON_INTERPRET=1 (the Triton engine on CPU tensors)")
@pytest.mark.skipif(not mo._ext.HAS_EXT, reason="needs the compiled CPU ops")
def test_auto_takes_the_next_engine_that_covers_the_call(monkeypatch):
    """The first engine refuses this call (its supports() says no): "auto" runs the second
    engine's fused op, not the reference, and the loss still equals the reference."""
    name = "MultiSimilarityLoss"
    monkeypatch.setattr(backend, "auto_order", lambda *a, **k: ["cpu", "triton"])
    _, cpu_impl = fused.IMPLS[("cpu", name)]
    monkeypatch.setitem(fused.IMPLS, ("cpu", name), (lambda *a: False, cpu_impl))
    ran = []
    supports, triton_impl = fused.IMPLS[("triton", name)]

    def spy(*a, **k):
        ran.append("triton")
        return triton_impl(*a, **k)

    monkeypatch.setitem(fused.IMPLS, ("triton", name), (supports, spy))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(21, 9, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (21,), generator=g)
    xe, tol = _engine_input(x)
    got = mo.losses.MultiSimilarityLoss(backend="auto")(xe, y)
    want = mo.losses.MultiSimilarityLoss(backend="reference")(x, y)
    assert ran == ["triton"]
    torch.testing.assert_close(got.double(), want, **tol)
    # when no engine covers it, the reference runs (no error under "auto")
    monkeypatch.setitem(fused.IMPLS, ("triton", name), (lambda *a: False, spy))
    ran.clear()
    torch.testing.assert_close(mo.losses.MultiSimilarityLoss(backend="auto")(xe, y).double(),
                               want, **tol)
    assert ran == []


def _engine_input(x):
    """x as the Triton engine takes it here (float64, or float32 with a triton older than
    3.5: launch.FP64_DOT) and the tolerance against the float64 reference."""
    if mt.launch.FP64_DOT:
        return x, {"rtol": 1e-6, "atol": 1e-9}
    return x.float(), {"rtol": 1e-4, "atol": 1e-5}


@pytest.mark.skipif(not mt.usable_on(torch.device("cpu")),
                    reason="needs TRITON_INTERPRET=1 (the Triton engine on CPU tensors)")
@pytest.mark.skipif(not mo._ext.HAS_EXT, reason="needs the compiled CPU ops")
def test_auto_prefers_the_engine_that_fuses_metrix(monkeypatch):
    """Both engines cover the clean loss, only the second fuses this Metrix call: "auto" takes
    the second (else the mixed term would run the materialising reference)."""
    name = "MultiSimilarityLoss"
    monkeypatch.setattr(backend, "auto_order", lambda *a, **k: ["cpu", "triton"])
    _, cpu_mix = fused.METRIX_IMPLS[("cpu", name)]
    monkeypatch.setitem(fused.METRIX_IMPLS, ("cpu", name), (lambda *a: False, cpu_mix))
    ran = []
    supports, triton_mix = fused.METRIX_IMPLS[("triton", name)]
    monkeypatch.setitem(fused.METRIX_IMPLS, ("triton", name),
                        (supports, lambda *a, **k: ran.append("triton") or triton_mix(*a, **k)))
    g = torch.Generator().manual_seed(4)
    x = torch.randn(19, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (19,), generator=g)
    xe, tol = _engine_input(x)
    cfg = mo.Metrix(lam=0.4)
    got = mo.losses.MultiSimilarityLoss(backend="auto", metrix=cfg)(xe, y)
    want = mo.losses.MultiSimilarityLoss(backend="reference", metrix=cfg)(x, y)
    assert ran == ["triton"]
    torch.testing.assert_close(got.double(), want, **tol)
    # with the CPU op fusing it again, the preferred engine keeps the call
    monkeypatch.setitem(fused.METRIX_IMPLS, ("cpu", name), (lambda *a: True, cpu_mix))
    ran.clear()
    mo.losses.MultiSimilarityLoss(backend="auto", metrix=cfg)(xe, y)
    assert ran == []
