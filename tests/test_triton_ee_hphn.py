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
from ee_hphn_checks import (check_duplicate_embeddings, check_edge_labels,
                            check_float32_and_half, degenerate_batch, engine_losses)
from test_fused_hphn_cpu import batch, ref_picks
from triton_cases import DEVICE, compiles_only, on_dev, requires_triton, run_sm90_script

pytestmark = requires_triton


def picks(x, y, n, pairs, dist):
    from metrix_ops.triton.ee_hphn import ee_hphn_mine_triton
    if n == 0:
        si = sj = y.new_empty(0)
    else:
        si, sj = all_segments(y) if pairs == "all" else expansion_segments(y, pairs)
    return ee_hphn_mine_triton(F.normalize(x, dim=1), y, si, sj, n, dist().is_inverted)


# (n, b, d, classes); the interpreter runs every point pair, so the large-class case (two
# classes of ~16: ~2000 points at n = 8) runs at n = 2 only
@pytest.mark.parametrize("n,b,d,classes", [(n, *c) for n in (0, 2, 8)
                                           for c in ((2, 3, 1), (7, 16, 3), (33, 16, 5))]
                         + [(2, 33, 3, 2)])
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
    pu = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 3], device=DEVICE)
    pw = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 1, 1, 4], device=DEVICE)
    lam = torch.tensor([1.0] * 9 + [2 / 3, 1 / 3, 0.5], dtype=torch.float64, device=DEVICE)
    scale = torch.ones(12, dtype=torch.float64, device=DEVICE)
    lab = torch.tensor([0, 0, 1, 2, 2, 1, 3, 3, 0, 0, 0, 2], device=DEVICE)
    for inverted in (False, True):
        torch.library.opcheck(torch.ops.metrix_ops.triton_ee_point_mine.default,
                              (x, pu, pw, lam, scale, lab, inverted))


_SM90 = r'''
import metrix_ops.triton.ee_hphn as ee

failed = []
ptrs = {"pu_ptr": "*i64", "pw_ptr": "*i64", "plab_ptr": "*i64", "col_ptr": "*i64"}
for fdt, acc, prec, rows in [("fp32", tl.float32, "tf32", 64), ("fp64", tl.float64, "ieee", 32)]:
    for inverted in (False, True):
        consts = dict(INVERTED=inverted, BLOCK_M=rows, BLOCK_N=rows, BLOCK_D=64, ACC=acc,
                      PRECISION=prec)
        try:
            compile_sm90(ee._ee_mine_kernel, consts, fdt, pointer_types=ptrs)
        except Exception as e:  # noqa: BLE001
            failed.append(f"{fdt} inverted={inverted}: {type(e).__name__}: {str(e)[:300]}")
print("\n".join(failed))
sys.exit(1 if failed else 0)
'''


@compiles_only
def test_kernel_compiles_for_h100():
    run_sm90_script(_SM90)
