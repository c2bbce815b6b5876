"""HPHNTripletLoss with Embedding Expansion on the Triton engine against the reference: the
mined indices exactly (float64), including near-ties, coincident and antipodal segments and
duplicates; loss and gradient over n, pairs, distances, edge labels, fp32 and half inputs;
routing; opcheck; sm_90 compilation.

Without a GPU these run under TRITON_INTERPRET=1 on CPU tensors."""

import pytest
import torch
import torch.nn.functional as F

from cases import assert_close_vg
from metrix_ops.distances import CosineSimilarity, LpDistance
from metrix_ops.ops.ee_mining import all_segments
from metrix_ops.reference.expansion_points import expansion_segments
from ee_hphn_checks import (brute_point_mine, check_duplicate_embeddings, check_edge_labels,
                            check_float32_and_half, degenerate_batch, engine_losses,
                            tie_tables)
from test_fused_hphn_cpu import batch, ref_picks
from torch_features import data_dependent_shapes
from triton_cases import (DEVICE, compiles_only, on_dev, requires_triton, run_sm90_script,
                          widest_dtype)

pytestmark = requires_triton


def picks(x, y, n, pairs, dist):
    from metrix_ops.triton.ee_hphn import ee_hphn_mine_triton
    if n == 0:
        si = sj = y.new_empty(0)
    else:
        si, sj = all_segments(y) if pairs == "all" else expansion_segments(y, pairs)
    return ee_hphn_mine_triton(F.normalize(x, dim=1), y, si, sj, n, dist().is_inverted)


# (n, b, d, classes); the interpreter runs every point pair, so the large-class case (two
# classes of ~16: ~2000 points at n = 8) runs at n = 2 only; 70 rows: several tiles of
# originals (64 per tile on the CPU) and of segments, as rows and as columns
@pytest.mark.parametrize("n,b,d,classes", [(n, *c) for n in (0, 2, 8)
                                           for c in ((2, 3, 1), (7, 16, 3), (33, 16, 5))]
                         + [(2, 33, 3, 2), (2, 70, 5, 10)])
@pytest.mark.parametrize("pairs", ["all", "adjacent"])
@pytest.mark.parametrize("dist", [LpDistance, CosineSimilarity])
def test_indices_equal_reference(n, pairs, dist, b, d, classes):
    x, y = batch(b, d, classes, seed=b + n, contiguous=pairs == "adjacent")
    expect = ref_picks(x, y, n, pairs, dist())
    x, y = on_dev(x, y)
    assert torch.equal(picks(x, y, n, pairs, dist).cpu(), expect)


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("dist", [LpDistance, CosineSimilarity])
def test_indices_near_ties_and_degenerate_segments(n, dist):
    x, y = degenerate_batch(n)
    expect = ref_picks(x, y, n, "all", dist())
    x, y = on_dev(x, y)
    assert torch.equal(picks(x, y, n, "all", dist).cpu(), expect)


@pytest.mark.parametrize("n", [1, 2, 5, 11])
@pytest.mark.parametrize("inverted", [False, True])
def test_point_mine_equals_brute_force_with_ties_across_tiles(n, inverted, monkeypatch):
    """The op against brute force on arbitrary tables (ee_hphn_checks.tie_tables), with exact
    ties the kernel meets in an order that is not the columns'; n = 11 and a cap of 4 points
    per row program: a segment's points in groups along the grid's second axis."""
    import metrix_ops.triton.ee_hphn as te
    monkeypatch.setattr(te, "MAX_NPR", 4)
    x, labels, si, sj, lam, scale = tie_tables(n, inverted)
    best, col = torch.ops.metrix_ops.triton_ee_point_mine(
        *on_dev(x, labels, si, sj), n, *on_dev(lam, scale), inverted)
    eb, ec = brute_point_mine(x, labels, si, sj, n, lam, scale, inverted)
    assert torch.equal(col.cpu(), ec)
    torch.testing.assert_close(best.cpu(), eb, rtol=1e-12, atol=1e-12)


def test_point_mine_checks_its_tables():
    x, labels, si, sj, lam, scale = tie_tables(2, False)
    op = torch.ops.metrix_ops.triton_ee_point_mine
    op(*on_dev(x, labels, si, sj), 2, *on_dev(lam, scale), False)  # as given: fine
    cross = labels.clone()
    cross[sj[0]] = cross[si[0]] + 10  # a segment across two classes
    if si[0] != sj[0]:
        with pytest.raises(ValueError, match="different labels"):
            op(*on_dev(x, cross, si, sj), 2, *on_dev(lam, scale), False)
    with pytest.raises(ValueError, match="plam must have shape"):
        op(*on_dev(x, labels, si, sj), 2, *on_dev(lam[:-1], scale), False)
    with pytest.raises(ValueError, match="rows of the batch"):
        op(*on_dev(x, labels, si + len(labels), sj), 2, *on_dev(lam, scale), False)
    with pytest.raises(ValueError, match="labels must have shape"):
        op(*on_dev(x, labels[:-1], si, sj), 2, *on_dev(lam, scale), False)


@pytest.mark.parametrize("name,n", [("HPHNTripletLoss", 2), ("HPHNTripletLoss", 0),
                                    ("MultiSimilarityLoss", 2), ("TripletMarginLoss", 1)])
def test_compiled_adjacent_pairs_of_different_labels_fail_in_the_op(name, n):
    """Compiled, "adjacent" pairs cannot be checked before the ops: they check them at run
    time (as the CPU ops do), n = 0 included, never a silent loss."""
    import metrix_ops as mo
    torch._dynamo.reset()
    loss = getattr(mo.losses, name)(backend="triton",
                                    expansion=mo.Expansion(n_points=n, pairs="adjacent"))
    compiled = torch.compile(lambda e, lab: loss(e, lab), fullgraph=True, backend="eager")
    dtype, tol = widest_dtype()
    x, good = on_dev(torch.randn(6, 5, dtype=dtype), torch.tensor([0, 0, 1, 1, 2, 2]))
    with data_dependent_shapes():  # (EE's segment lists, on an older torch)
        torch.testing.assert_close(compiled(x, good), loss(x, good), **tol)
        with pytest.raises(Exception, match="different labels"):
            compiled(x, on_dev(torch.tensor([0, 0, 1, 2, 2, 2]))[0])


@pytest.fixture
def op_calls(monkeypatch):
    import metrix_ops.triton.ee_hphn as te
    calls, real = [], te.ee_hphn_mine_triton
    monkeypatch.setattr(te, "ee_hphn_mine_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("n,pairs", [(0, "all"), (2, "all"), (8, "all"), (2, "adjacent")])
@pytest.mark.parametrize("dist", [LpDistance, CosineSimilarity])
def test_loss_and_grad_float64(n, pairs, dist, op_calls):
    x, y = batch(29, 7, 5, seed=n, contiguous=pairs == "adjacent")
    x, y = on_dev(x, y)
    tri, ref = engine_losses("triton", n, pairs, distance=dist(), margin=0.3)
    assert_close_vg(lambda e: tri(e, y), lambda e: ref(e, y), x)
    assert op_calls


@pytest.mark.parametrize("labels", [[0], [0, 0, 0, 0, 0], [0, 1, 2, 3, 4], [0, 0, 1, 2, 2, 2, 3]],
                         ids=["b1", "one_class", "singletons", "size1_classes"])
def test_edge_labels(labels):
    check_edge_labels("triton", on_dev, labels)


def test_duplicate_embeddings():
    check_duplicate_embeddings("triton", on_dev)


def test_float32_and_half():
    check_float32_and_half("triton", on_dev)


def test_opcheck():
    x = F.normalize(torch.randn(9, 4, dtype=torch.float64), dim=1).to(DEVICE)
    lab = torch.tensor([0, 0, 1, 2, 2, 1, 3, 3, 0], device=DEVICE)
    si, sj = torch.tensor([0, 3], device=DEVICE), torch.tensor([1, 4], device=DEVICE)
    for n, inverted in [(2, False), (3, True), (0, False)]:
        lam = torch.cat([torch.ones(9), torch.arange(1, n + 1).repeat(2) / (n + 1)])
        scale = torch.rand(9 + 2 * n, generator=torch.Generator().manual_seed(n)) + 0.5
        torch.library.opcheck(torch.ops.metrix_ops.triton_ee_point_mine.default,
                              (x, lab, si, sj, n, lam.double().to(DEVICE),
                               scale.double().to(DEVICE), inverted))


_SM90 = r'''
import metrix_ops.triton.ee_hphn as ee

failed = []
ptrs = {"lab_ptr": "*i64", "si_ptr": "*i64", "sj_ptr": "*i64", "col_ptr": "*i64"}
for fdt, acc, prec in [("fp32", tl.float32, "tf32"), ("fp64", tl.float64, "ieee")]:
    for inverted, row_seg, npr in [(False, False, 1), (True, False, 1), (False, True, 8),
                                   (True, True, 16)]:
        consts = dict(ROW_SEG=row_seg, INVERTED=inverted, BR=16 if row_seg else 32, NPR=npr,
                      BCO=32, BCS=16, BLOCK_D=32, ACC=acc, PRECISION=prec)
        try:
            compile_sm90(ee._ee_mine_kernel, consts, fdt, pointer_types=ptrs)
        except Exception as e:  # noqa: BLE001
            failed.append(f"{fdt} inverted={inverted} row_seg={row_seg}: "
                          f"{type(e).__name__}: {str(e)[:300]}")
print("\n".join(failed))
sys.exit(1 if failed else 0)
'''


@compiles_only
def test_kernel_compiles_for_h100():
    run_sm90_script(_SM90)
