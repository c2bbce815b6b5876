"""CUDA graphs (torch.compile(mode="reduce-overhead")): the ops that read tensor data on the
host, or whose backward takes a table its forward read (triton/table_cache.py), carry torch's
cudagraph_unsafe tag (torch >= 2.9), so that Inductor leaves them out of its CUDA graphs
instead of failing at the read or replaying a stale table. Here: the Triton engine's tagged
ops are exactly those that read or take a table over every loss, Metrix, EE and miner call
(measured on the interpreter, each read charged to the custom op it ran in); a compiled
graph with only untagged ops (the clean MS and Contrastive, the whole graph capturable) and
one with a tagged op, as Inductor's own check sees them; the CUDA engine's tags where its
CUDA code reads (csrc/common/op_tags.h), and on a GPU the loss under reduce-overhead equal
to eager."""
import collections
import contextlib
import inspect
import sys

import pytest
import torch

import metrix_ops as mo
from metrix_ops import _ext
from metrix_ops.triton import usable_on

UNSAFE = getattr(torch.Tag, "cudagraph_unsafe", None)
needs_tag = pytest.mark.skipif(UNSAFE is None, reason="torch < 2.9 has no cudagraph_unsafe tag")
interpreter = pytest.mark.skipif(not usable_on(torch.device("cpu")),
                                 reason="needs TRITON_INTERPRET=1")
L, mi = mo.losses, mo.miners


def _triton_calls():
    kw = dict(backend="triton")
    ref = lambda make: (lambda x, y: make()(x, y, None, x[:13].detach() * 1.0, y[:13]))  # noqa: E731
    calls = {n: getattr(L, n)(**kw) for n in (
        "MultiSimilarityLoss", "ContrastiveLoss", "CircleLoss", "NTXentLoss", "SupConLoss",
        "LiftedStructureLoss", "GeneralizedLiftedStructureLoss", "TripletMarginLoss",
        "HPHNTripletLoss", "NPairsLoss")}
    calls["ProxyAnchorLoss"] = L.ProxyAnchorLoss(5, 16, **kw)
    calls["ProxyNCALoss"] = L.ProxyNCALoss(5, 16, **kw)
    for n in ("MultiSimilarityLoss", "ContrastiveLoss", "CircleLoss",
              "GeneralizedLiftedStructureLoss"):
        calls[n + "+metrix"] = getattr(L, n)(metrix=mo.Metrix(lam=0.3), **kw)
    calls["ProxyAnchor+metrix"] = L.ProxyAnchorLoss(5, 16, metrix=mo.Metrix(lam=0.3), **kw)
    calls["ProxyNCA+metrix"] = L.ProxyNCALoss(5, 16, metrix=mo.Metrix(lam=0.3), **kw)
    for n in ("MultiSimilarityLoss", "LiftedStructureLoss", "GeneralizedLiftedStructureLoss",
              "NPairsLoss", "TripletMarginLoss", "HPHNTripletLoss"):
        calls[n + "+ee"] = getattr(L, n)(expansion=mo.Expansion(n_points=2), **kw)
    calls["MS+miner"] = L.MultiSimilarityLoss(miner=mi.MultiSimilarityMiner(), **kw)
    calls["Triplet+semihard"] = L.TripletMarginLoss(
        miner=mi.TripletMarginMiner(type_of_triplets="semihard"), **kw)
    calls["Contrastive+ref"] = ref(lambda: L.ContrastiveLoss(**kw))
    calls["Triplet+ref"] = ref(lambda: L.TripletMarginLoss(**kw))
    calls["MS+metrix+ref"] = ref(lambda: L.MultiSimilarityLoss(metrix=mo.Metrix(lam=0.3), **kw))
    return calls


@needs_tag
@interpreter
def test_triton_ops_tagged_exactly_where_they_read_the_host(monkeypatch):
    from torch._library import custom_ops
    from host_reads import SyncCounter, second_step
    from metrix_ops.triton import table_cache
    ops = {inspect.unwrap(d._init_fn).__code__: name.split("::")[1]
           for name, d in custom_ops.OPDEFS.items()
           if name.startswith("metrix_ops::triton_")}

    def active_op():
        f = sys._getframe(1)
        while f is not None and f.f_code not in ops:
            f = f.f_back
        return None if f is None else ops[f.f_code]

    reads, takes = collections.Counter(), collections.Counter()

    class OpCounter(SyncCounter):
        def _hit(self, what):
            reads[active_op()] += 1
            super()._hit(what)

    real = table_cache.handed

    def handed(tensors, extra, build, backward):
        if backward:
            takes[active_op()] += 1
        return real(tensors, extra, build, backward)

    monkeypatch.setattr(table_cache, "handed", handed)
    g = torch.Generator().manual_seed(0)
    x0, y = torch.randn(24, 16, generator=g), torch.randint(0, 5, (24,), generator=g)
    for name, loss in _triton_calls().items():
        second_step(OpCounter, loss, x0, y)
    tagged = {name for name in ops.values()
              if UNSAFE in getattr(torch.ops.metrix_ops, name).default.tags}
    measured = (set(reads) | set(takes)) - {None}
    assert measured == tagged, (sorted(measured - tagged), sorted(tagged - measured))
    assert {"triton_ms_rows", "triton_contrastive_rows"} & tagged == set()


def _graphs(loss):
    """The forward and backward graphs AOTAutograd hands a compiler for loss(x, y)."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    fn = torch.compile(lambda e, lab: loss(e, lab), fullgraph=True,
                       backend=aot_autograd(fw_compiler=keep, bw_compiler=keep))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 8, generator=g, requires_grad=True)
    fn(x, torch.randint(0, 4, (20,), generator=g)).backward()
    return graphs


def _first_unsafe(graphs):
    from torch._inductor import config
    from torch._inductor.utils import get_first_incompatible_cudagraph_node
    # with graph_partition on (torch 2.9's default) torch 2.9 cuts the graph at a tagged op
    # instead of naming it here: asked with it off, it names the op, as 2.14 does either way
    off = (config.patch(graph_partition=False) if hasattr(config, "graph_partition")
           else contextlib.nullcontext())
    with off:
        return [getattr(get_first_incompatible_cudagraph_node(gm), "target", None)
                for gm in graphs]


@needs_tag
@pytest.mark.parametrize("backend", [
    pytest.param("triton", marks=interpreter),
    pytest.param("cpu", marks=pytest.mark.skipif(not _ext.HAS_EXT, reason="no extension"))])
def test_inductor_sees_which_compiled_graphs_can_be_captured(backend):
    """Inductor's own test of a graph (the one reduce-overhead applies): the clean MS and
    Contrastive graphs have nothing it must leave out; TripletMarginLoss's op (the slot
    count of its positives, read on the host on both GPU engines) is named, forward and
    backward."""
    for make in (L.MultiSimilarityLoss, L.ContrastiveLoss):
        assert _first_unsafe(_graphs(make(backend=backend))) == [None, None]
    unsafe = _first_unsafe(_graphs(L.TripletMarginLoss(backend=backend)))
    assert all(t is not None and UNSAFE in t.tags for t in unsafe), unsafe
    assert len(unsafe) == 2


# the compiled ops whose CUDA implementation reads the host (csrc/cuda: .item(), .cpu(), label
# layouts built on the host, the proxy ops' label range check), or whose backward needs its
# forward's such table
CUDA_READS = (
    ["ee_neg_lse_fwd", "ee_neg_lse_bwd", "ee_triplet_fwd", "ee_triplet_bwd", "ee_hphn_mine",
     "lifted_fwd", "lifted_bwd", "triplet_all_fwd", "triplet_all_bwd", "triplet_mined_fwd",
     "triplet_mined_bwd", "pair_sims_fwd", "pair_sims_bwd", "proxy_anchor_fwd",
     "proxy_anchor_bwd", "proxy_anchor_weighted_fwd", "proxy_anchor_weighted_bwd",
     "proxy_nca_fwd", "proxy_nca_bwd", "proxy_anchor_metrix_fwd", "proxy_anchor_metrix_bwd",
     "proxy_nca_metrix_fwd", "proxy_nca_metrix_bwd"]
    + [f"{loss}_metrix_mix{refs}_{way}" for loss in ("ms", "contrastive", "circle", "lifted")
       for refs in ("", "_refs") for way in ("fwd", "bwd")] + ["ee_point_mine"])


@needs_tag
@pytest.mark.skipif(not _ext.HAS_EXT, reason="no extension")
def test_compiled_ops_tagged_where_their_cuda_code_reads():
    names = [n for n in CUDA_READS
             if n != "ee_point_mine" and "metrix_mix" not in n or _ext.HAS_CUDA_EXT]
    for name in names:
        assert UNSAFE in getattr(torch.ops.metrix_ops, name).default.tags, name
    for name in ("ms_loss_fwd", "ms_loss_bwd", "contrastive_fwd", "gen_lifted_fwd",
                 "ntxent_fwd", "supcon_fwd", "circle_fwd", "sim_row_stats"):
        assert UNSAFE not in getattr(torch.ops.metrix_ops, name).default.tags, name


@needs_tag
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("case", ["ms", "triplet", "ms-metrix", "proxy-anchor"])
def test_reduce_overhead_compile_equals_eager_on_gpu(case, backend):
    """Three steps of a compiled loss under mode="reduce-overhead" (the CUDA graphs recorded
    on the second and replayed on the third, where capturable) give eager's values and
    gradients on fresh batches."""
    if backend == "cuda" and not _ext.HAS_CUDA_EXT:
        pytest.skip("the CUDA kernels are not built")
    make = {"ms": lambda: L.MultiSimilarityLoss(backend=backend),
            "triplet": lambda: L.TripletMarginLoss(backend=backend),
            "ms-metrix": lambda: L.MultiSimilarityLoss(backend=backend,
                                                       metrix=mo.Metrix(lam=0.3)),
            "proxy-anchor": lambda: L.ProxyAnchorLoss(8, 32, backend=backend)}[case]
    loss = make().cuda()
    torch._dynamo.reset()
    compiled = torch.compile(lambda e, lab: loss(e, lab), mode="reduce-overhead")
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        x = torch.randn(64, 32, generator=g).cuda()
        y = torch.randint(0, 8, (64,), generator=g).cuda()
        xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        got = compiled(xc, y)
        got.backward()
        want = loss(xe, y)
        want.backward()
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-3, atol=1e-5)


@pytest.mark.skipif(not mo.triton.HAS_TRITON, reason="triton is not installed")
def test_triton_op_schema_from_the_ops_own_annotations():
    """launch.triton_op wraps the function (its device guard); the schema still comes from
    the function's own annotations, resolved in its own module (an Optional[Tensor] here,
    a name launch.py does not have), and the op is a working custom op."""
    import types
    from metrix_ops.triton.launch import triton_op
    mod = types.ModuleType("user_ops")
    exec("from __future__ import annotations\nfrom typing import Optional\nimport torch\n"
         "def f(x: torch.Tensor, w: Optional[torch.Tensor]) -> torch.Tensor:\n"
         "    return x * 2 if w is None else x * w\n", mod.__dict__)
    op = triton_op("metrix_ops_test::scaled")(mod.f)
    assert str(torch.ops.metrix_ops_test.scaled.default._schema).endswith(
        "scaled(Tensor x, Tensor? w) -> Tensor")
    x = torch.randn(3)
    torch.testing.assert_close(op(x, None), x * 2)
    assert UNSAFE is None or UNSAFE not in torch.ops.metrix_ops_test.scaled.default.tags
