"""The Triton pair losses as modules: whole under torch.compile(fullgraph=True), unchanged by
bf16 autocast, and CrossBatchMemory's bank streamed through the kernels; and their kernels
compiled for an H100 (sm_90) on a machine without a GPU."""

import pytest
import torch

import metrix_ops as mo
from cases import OWN_ROWS_LOSSES, check_own_rows_with_gradient, value_and_grad
from torch_features import data_dependent_shapes
from triton_cases import (DEVICE, compiles_only, on_dev, requires_triton, run_sm90_script,
                          widest_dtype)

pytestmark = requires_triton

COMPILABLE = [("MultiSimilarityLoss", {}), ("ContrastiveLoss", {}),
              ("ContrastiveLoss", {"reducer": mo.reducers.MeanReducer(), "pos_margin": 0.1}),
              ("TripletMarginLoss", {}), ("CircleLoss", {}),
              ("GeneralizedLiftedStructureLoss", {}), ("LiftedStructureLoss", {}),
              ("NPairsLoss", {}), ("ProxyAnchorLoss", {"num_classes": 6, "embedding_size": 7}),
              ("ProxyNCALoss", {"num_classes": 6, "embedding_size": 7}),
              ("NTXentLoss", {}), ("SupConLoss", {}),
              # the L2 of raw rows: the kernels' RAW form and the `raw` triplet kernels
              ("TripletMarginLoss", {"distance": mo.distances.LpDistance(
                  normalize_embeddings=False)}),
              ("ContrastiveLoss", {"distance": mo.distances.LpDistance(
                  normalize_embeddings=False, power=2), "neg_margin": 8.0}),
              ("GeneralizedLiftedStructureLoss", {"distance": mo.distances.LpDistance(
                  normalize_embeddings=False)}),
              ("LiftedStructureLoss", {"distance": mo.distances.LpDistance(
                  normalize_embeddings=False), "neg_margin": 4.0})]


@pytest.mark.parametrize("name,kw", COMPILABLE, ids=[f"{n}-{i}" for i, (n, _) in enumerate(COMPILABLE)])
def test_module_under_fullgraph_compile_equals_eager(name, kw):
    """The launches are custom ops: the whole module traces (input checks, pair counts, the
    no-pairs rule, the reducer), as on the CPU backend."""
    torch._dynamo.reset()
    loss = getattr(mo.losses, name)(backend="triton", **kw).to(DEVICE)  # proxies too
    compiled = torch.compile(lambda e, lab: loss(e, lab), fullgraph=True, backend="eager")
    g = torch.Generator().manual_seed(3)
    for b, k in [(13, 4), (6, 6), (1, 1)]:  # random, no positives, the no-pairs rule
        x, y = on_dev(torch.randn(b, 7, generator=g), torch.randint(0, k, (b,), generator=g))
        with data_dependent_shapes():  # (NPairs' kept pairs, on an older torch)
            va, (ga,) = value_and_grad(lambda e: compiled(e, y), x)
        vb, (gb,) = value_and_grad(lambda e: loss(e, y), x)
        torch.testing.assert_close(va, vb, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6)


AUGMENTED = [("MultiSimilarityLoss", {"metrix": mo.Metrix(lam=0.3)}),
             ("ContrastiveLoss", {"metrix": mo.Metrix(lam=0.6, pairs="anchor_neg")}),
             ("CircleLoss", {"metrix": mo.Metrix(lam=0.3)}),
             ("GeneralizedLiftedStructureLoss", {"metrix": mo.Metrix(lam=0.3)}),
             ("MultiSimilarityLoss", {"expansion": mo.Expansion(n_points=2)}),
             ("NPairsLoss", {"expansion": mo.Expansion(n_points=1)}),
             ("LiftedStructureLoss", {"expansion": mo.Expansion(n_points=2)}),
             ("GeneralizedLiftedStructureLoss", {"expansion": mo.Expansion(n_points=1)}),
             ("TripletMarginLoss", {"expansion": mo.Expansion(n_points=2)}),
             ("HPHNTripletLoss", {"expansion": mo.Expansion(n_points=3)}),
             ("HPHNTripletLoss", {"expansion": mo.Expansion(n_points=2, pairs="adjacent"),
                                  "distance": mo.distances.CosineSimilarity()})]


@pytest.mark.parametrize("name,kw", AUGMENTED,
                         ids=[f"{n}-{i}" for i, (n, _) in enumerate(AUGMENTED)])
def test_metrix_and_ee_under_fullgraph_compile_equal_eager(name, kw, monkeypatch):
    """Metrix and EE on this engine trace whole too: the chunk tables, whose sizes depend on
    the labels' values, are built inside the ops, and EE-HPHN's per-anchor picks are scatter
    reductions (no padded table). The op calls are counted, so the Triton kernels ran."""
    import metrix_ops.triton.ee_hphn as te
    import metrix_ops.triton.ee_neg_lse as neg
    import metrix_ops.triton.metrix_tiles as mt
    calls = []
    for mod, fn in ((mt, "chunk_table"), (neg, "unit_chunks"), (te, "ee_hphn_mine_triton")):
        real = getattr(mod, fn)
        monkeypatch.setattr(mod, fn, lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    torch._dynamo.reset()
    loss = getattr(mo.losses, name)(backend="triton", **kw).to(DEVICE)
    compiled = torch.compile(lambda e, lab: loss(e, lab), fullgraph=True, backend="eager")
    g = torch.Generator().manual_seed(5)
    dtype, tol = widest_dtype()
    for b, k in [(14, 4), (6, 6), (2, 1)]:  # random, no positives, one class
        x, y = on_dev(torch.randn(b, 7, generator=g, dtype=dtype),
                      torch.randint(0, k, (b,), generator=g))
        if "pairs" in str(kw):  # adjacent: rows 2t, 2t+1 share a label
            y[1::2] = y[0::2]
        calls.clear()
        with data_dependent_shapes():  # (EE's segment lists, on an older torch)
            va, (ga,) = value_and_grad(lambda e: compiled(e, y), x)
        assert calls  # the compiled module ran the Triton ops
        vb, (gb,) = value_and_grad(lambda e: loss(e, y), x)
        torch.testing.assert_close(va, vb, **tol)
        torch.testing.assert_close(ga, gb, **tol)


def test_compiled_metrix_takes_a_class_over_max_class(monkeypatch):
    """Metrix cuts a class over MAX_CLASS rows into blocks, so a compiled call needs no
    fallback: fullgraph, it runs the Triton op and equals the reference."""
    import metrix_ops.triton.ms_metrix as mm
    from metrix_ops.triton.metrix_tiles import MAX_CLASS
    calls, real = [], mm.ms_metrix_rows_triton
    monkeypatch.setattr(mm, "ms_metrix_rows_triton",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    loss = mo.losses.MultiSimilarityLoss(backend="triton", metrix=mo.Metrix(lam=0.3))
    ref = mo.losses.MultiSimilarityLoss(backend="reference", metrix=mo.Metrix(lam=0.3))
    dtype, _ = widest_dtype()
    x, y = on_dev(torch.randn(MAX_CLASS + 3, 5, dtype=dtype),
                  torch.tensor([0] * (MAX_CLASS + 1) + [1, 2]))
    torch._dynamo.reset()
    compiled = torch.compile(lambda e, lab: loss(e, lab), fullgraph=True, backend="eager")
    # (float32 where the engine has no float64: against the float64 reference)
    torch.testing.assert_close(compiled(x, y).double(), ref(x.double(), y))
    assert calls


def test_compiled_ee_names_a_class_over_the_kernels_limit():
    """Eagerly a class over EE_MAX_CLASS rows is not covered (the call names backend='auto',
    which takes the next engine); compiled, the engine is chosen without the labels' values,
    and the op says what to do instead of failing inside."""
    from metrix_ops.triton.ee_chunks import EE_MAX_CLASS
    ee = mo.Expansion(n_points=1, pairs="all")  # ("adjacent" takes any class: a unit is a pair)
    loss = mo.losses.MultiSimilarityLoss(backend="triton", expansion=ee)
    x, y = on_dev(torch.randn(EE_MAX_CLASS + 4, 5, dtype=widest_dtype()[0]),
                  torch.tensor([0] * (EE_MAX_CLASS + 2) + [1, 1]))
    with pytest.raises(NotImplementedError, match="backend='auto'"):
        loss(x, y)
    torch._dynamo.reset()
    compiled = torch.compile(lambda e, lab: loss(e, lab), fullgraph=True, backend="eager")
    with data_dependent_shapes(), pytest.raises(
            ValueError, match=f"labels: .* at most {EE_MAX_CLASS} rows.*backend='cuda'"):
        compiled(x, y)


@pytest.mark.parametrize("name", ["MultiSimilarityLoss", "ContrastiveLoss"])
def test_under_bf16_autocast(name):
    """Under autocast the loss is computed in fp32 from the (fp32) leaf, as without it."""
    g = torch.Generator().manual_seed(11)
    x, y = on_dev(torch.randn(21, 12, generator=g), torch.randint(0, 4, (21,), generator=g))
    loss = getattr(mo.losses, name)(backend="triton")
    v, (gx,) = value_and_grad(lambda e: loss(e, y), x)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        va, (ga,) = value_and_grad(lambda e: loss(e, y), x)
    assert va.dtype == torch.float32 and ga.dtype == torch.float32
    torch.testing.assert_close(va, v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ga, gx, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["MultiSimilarityLoss", "ContrastiveLoss", "TripletMarginLoss"])
def test_cross_batch_memory_streams_through_the_kernels(name):
    """CrossBatchMemory's fused path (the batch against the rolled bank, own slots excluded)
    over calls that fill and wrap the bank, against the same module on the reference."""
    mods = [mo.losses.CrossBatchMemory(getattr(mo.losses, name)(backend=b), 5, memory_size=23)
            .to(DEVICE).double() for b in ("triton", "reference")]
    g = torch.Generator().manual_seed(12)
    for b in (7, 9, 8, 11, 5):
        x = torch.randn(b, 5, generator=g, dtype=torch.float64)
        x, y = on_dev(x, torch.randint(0, 4, (b,), generator=g))
        v, (gx,) = value_and_grad(lambda e: mods[0](e, y), x)
        vr, (gr,) = value_and_grad(lambda e: mods[1](e, y), x)
        torch.testing.assert_close(v, vr, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(gx, gr, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", OWN_ROWS_LOSSES)
def test_own_rows_path_with_references_that_carry_gradient(name):
    check_own_rows_with_gradient("triton", on_dev, name)


_SM90 = r'''
import metrix_ops.triton.multi_similarity as ms
import metrix_ops.triton.contrastive as con
import metrix_ops.triton.hphn_triplet as hp
import metrix_ops.triton.pairs as pairs

failed = []
# (fp type, acc, precision, rows per tile, padded D of the gradient kernels): the GPU tile
# sizes of launch_config at D = 128 and D = 512
for fdt, acc, prec, rows, width in [("fp32", tl.float32, "tf32", 64, 128),
                                    ("fp32", tl.float32, "tf32", 32, 512),
                                    ("fp64", tl.float64, "ieee", 16, 512)]:
    tiles = dict(BLOCK_M=rows, BLOCK_N=rows, BLOCK_D=64, ACC=acc, PRECISION=prec)
    grad = dict(tiles, BLOCK_DO=width)
    cases = [(ms._ms_fwd_kernel, dict(tiles, EXCLUDE_DIAG=True), None),
             (con._con_fwd_kernel, dict(tiles, EXCLUDE_DIAG=True, COSINE=False),
              {"pc_ptr": "*i64", "nc_ptr": "*i64"}),
             (con._con_fwd_kernel, dict(tiles, EXCLUDE_DIAG=True, COSINE=False, RAW=True),
              {"pc_ptr": "*i64", "nc_ptr": "*i64"}),
             (hp._hphn_mine_kernel, dict(tiles, EXCLUDE_DIAG=True), {"out_ptr": "*i64"}),
             (hp._hphn_mine_kernel, dict(tiles, EXCLUDE_DIAG=True, RAW=True),
              {"out_ptr": "*i64"})]
    for tile_fn in (ms._ms_grad_tile, con._con_grad_tile_l2, con._con_grad_tile_cos):
        cases += [(pairs.pair_grad_dx_kernel, dict(grad, GRAD_TILE=tile_fn, EXCLUDE_DIAG=True), None),
                  (pairs.pair_grad_dr_kernel, dict(grad, GRAD_TILE=tile_fn, EXCLUDE_DIAG=False), None),
                  (pairs.pair_grad_sym_kernel, dict(grad, GRAD_TILE=tile_fn), None)]
    # rows of any norm (RAW: the norms' table read in the tile, the radial gradient part)
    raw = dict(grad, GRAD_TILE=con._con_grad_tile_l2, RAW=True)
    cases += [(pairs.pair_grad_dx_kernel, dict(raw, EXCLUDE_DIAG=True), None),
              (pairs.pair_grad_dr_kernel, dict(raw, EXCLUDE_DIAG=False), None),
              (pairs.pair_grad_sym_kernel, raw, None)]
    for fn, consts, ptrs in cases:
        consts = {k: v for k, v in consts.items() if k in fn.arg_names}
        try:
            compile_sm90(fn, consts, fdt, num_warps=4 if width <= 128 else 8, pointer_types=ptrs)
        except Exception as e:  # noqa: BLE001
            failed.append(f"{fn.__name__} {fdt} D{width}: {type(e).__name__}: {str(e)[:300]}")
print("\n".join(failed))
sys.exit(1 if failed else 0)
'''


@compiles_only
def test_pair_kernels_compile_for_h100():
    """The MS, contrastive and HPHN kernels and the shared gradient kernels (with each loss's
    G tile, and in their RAW form) compile for sm_90 at the GPU tile sizes, fp32 and fp64,
    without a GPU."""
    run_sm90_script(_SM90)
