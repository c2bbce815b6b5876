"""The Triton kernels behind HPHN triplet's picks on the GPU engines, under TRITON_INTERPRET=1:

- triton/pick_sims.py (the chosen distances and their gradient) against the CPU op
  (hphn_picks_cpu.cpp) and the PyTorch form from gathered rows (_pick_sims_torch), values and
  gradients under random upstream weights;
- triton/ee_side_pairs.py (each anchor's closest side pair, encoded) against the PyTorch
  scatter reductions (side_pairs_torch) on mining outputs drawn with many ties, so that
  every tie rule (value, then lowest column, then earliest side entry) decides;
- opcheck, and compilation for sm_90.
The losses through them are checked against the reference in test_triton_ee_hphn.py."""
import pytest
import torch
import torch.nn.functional as F

from metrix_ops import _ext
from metrix_ops.fused.ee_hphn_picks import side_pairs_torch
from metrix_ops.fused.hphn_triplet import _pick_sims_torch
from metrix_ops.ops.ee_mining import all_segments
from metrix_ops.reference.expansion_points import expansion_segments, points_on_segments
from test_hphn_picks_cpu import random_picks
from triton_cases import DEVICE, compile_sm90, compiles_only, requires_triton, run_sm90_script

pytestmark = requires_triton

TOL = {torch.float64: (1e-12, 1e-10), torch.float32: (1e-5, 1e-4)}  # values, gradients


def _values_and_grads(f, x, idx, n, l2, wp, ws):
    xu = x.detach().clone().requires_grad_()
    pos, san = f(xu, idx, n, l2)
    ((pos * wp).sum() + (san * ws).sum()).backward()
    return pos.detach(), san.detach(), xu.grad


@pytest.mark.parametrize("l2", [False, True], ids=["cos", "l2"])
@pytest.mark.parametrize("b,d,n,seed,dtype", [
    (1, 3, 2, 0, torch.float64), (7, 5, 3, 1, torch.float64), (33, 17, 8, 2, torch.float64),
    (40, 200, 1, 3, torch.float64), (20, 9, 0, 4, torch.float64),
    (301, 70, 8, 5, torch.float32), (16, 16, 2, 6, torch.float32)])
def test_pick_sims_equal_cpu_op_and_torch_form(b, d, n, seed, dtype, l2):
    from metrix_ops.triton.pick_sims import hphn_pick_sims_triton
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(b, d, dtype=torch.float64, generator=g), dim=1).to(dtype)
    if b >= 4:
        x[2] = x[1]  # duplicate rows: L2 by difference is exactly 0 there
    idx = random_picks(b, n, seed)
    wp, ws = (torch.randn(b, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    got = _values_and_grads(hphn_pick_sims_triton, *(t.to(DEVICE) for t in (x, idx)), n, l2,
                            wp.to(DEVICE), ws.to(DEVICE))
    refs = [_pick_sims_torch]
    if _ext.HAS_EXT:
        from metrix_ops.ops.hphn_picks import hphn_pick_sims
        refs.append(hphn_pick_sims)
    vtol, gtol = TOL[dtype]
    for f in refs:
        want = _values_and_grads(f, x, idx, n, l2, wp, ws)
        for name, a, e in zip(("pos", "s_an", "dx"), got, want):
            tol = vtol if name != "dx" else gtol
            torch.testing.assert_close(a.cpu(), e, rtol=tol, atol=tol, msg=f"{f.__name__} {name}")


def test_pick_sims_half_inputs_match_fp32_form():
    """bf16/fp16 rows: the kernel sums in fp32 and returns the rows' dtype; against the
    PyTorch form on the same rows upcast to fp32."""
    from metrix_ops.triton.pick_sims import hphn_pick_sims_triton
    g = torch.Generator().manual_seed(7)
    x = F.normalize(torch.randn(24, 40, generator=g), dim=1)
    idx = random_picks(24, 3, 7)
    for dt in (torch.bfloat16, torch.float16):
        xh = x.to(dt)
        pos, san = hphn_pick_sims_triton(xh.to(DEVICE), idx.to(DEVICE), 3, True)
        assert pos.dtype == dt and san.dtype == dt
        wpos, wsan = _pick_sims_torch(xh.float(), idx, 3, True)
        tol = 2e-2 if dt == torch.bfloat16 else 2e-3
        torch.testing.assert_close(pos.float().cpu(), wpos, rtol=tol, atol=tol)
        torch.testing.assert_close(san.float().cpu(), wsan, rtol=tol, atol=tol)


def test_pick_sims_empty_batch_and_bad_picks():
    from metrix_ops.triton.pick_sims import hphn_pick_sims_triton
    x = torch.zeros(0, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    pos, san = hphn_pick_sims_triton(x, torch.zeros(0, 7, dtype=torch.long, device=DEVICE), 2,
                                     False)
    assert pos.shape == san.shape == (0,)
    (pos.sum() + san.sum()).backward()
    assert x.grad.shape == (0, 5)
    y = torch.randn(4, 5, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="idx must be int64 of shape"):
        hphn_pick_sims_triton(y, torch.zeros(4, 6, dtype=torch.long, device=DEVICE), 2, False)
    with pytest.raises(ValueError, match="idx must be int64"):
        hphn_pick_sims_triton(y, torch.zeros(4, 7, dtype=torch.int32, device=DEVICE), 2, False)


def _mining(labels, n, pairs, seed, inverted, levels):
    """Points of the expansion and a per-point mining output with many exact ties: values
    from `levels` distinct numbers, columns from a few, some points without a negative."""
    seg_i, seg_j = (all_segments(labels) if pairs == "all"
                    else expansion_segments(labels, pairs)) if n > 0 or pairs != "all" \
        else (labels.new_empty(0), labels.new_empty(0))
    pts = points_on_segments(labels, n, seg_i, seg_j)
    g = torch.Generator().manual_seed(seed)
    best = torch.randint(0, levels, (pts.size,), generator=g).double() / levels
    col = torch.randint(0, min(4, pts.size), (pts.size,), generator=g)  # a few points
    col[torch.rand(pts.size, generator=g) < 0.2] = -1
    best[col < 0] = float("-inf") if inverted else float("inf")
    return pts, best, col


@pytest.mark.parametrize("inverted", [False, True])
@pytest.mark.parametrize("n,pairs,labels", [
    (2, "all", [0, 0, 1, 1, 1, 2, 0, 3]), (1, "all", [0] * 9 + [1] * 4),
    (5, "all", [0, 1, 0, 1, 0, 1, 2]), (3, "adjacent", [0, 0, 1, 1, 2, 2, 2, 2]),
    (8, "all", [0, 0, 0]), (0, "all", [0, 1, 1]), (0, "adjacent", [0, 0, 1, 1]),
    (4, "all", [0]), (2, "all", [0, 1, 2, 3])])
@pytest.mark.parametrize("levels", [2, 1000])
def test_side_pairs_equal_torch_form(n, pairs, labels, inverted, levels):
    from metrix_ops.triton.ee_side_pairs import ee_side_pairs_triton
    labels = torch.tensor(labels)
    for seed in range(3):
        pts, best, col = _mining(labels, n, pairs, seed, inverted, levels)
        want = side_pairs_torch(pts, best, col, inverted)
        got = ee_side_pairs_triton(best.to(DEVICE), col.to(DEVICE), pts.seg_i.to(DEVICE),
                                   pts.seg_j.to(DEVICE), len(labels), n, inverted)
        torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)


def test_side_pairs_without_any_negative():
    from metrix_ops.triton.ee_side_pairs import ee_side_pairs_triton
    labels = torch.tensor([0, 0, 0, 0])
    pts, best, _ = _mining(labels, 2, "all", 0, False, 5)
    col = torch.full_like(best, -1, dtype=torch.long)
    got = ee_side_pairs_triton(best.to(DEVICE), col.to(DEVICE), pts.seg_i.to(DEVICE),
                               pts.seg_j.to(DEVICE), 4, 2, False)
    assert (got == -1).all()
    assert got.shape == (4, 6)


def test_opcheck():
    from metrix_ops.triton import ee_side_pairs, pick_sims  # noqa: F401  (registers the ops)
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(9, 6, dtype=torch.float64, generator=g), dim=1).to(DEVICE)
    idx = random_picks(9, 3, 0).to(DEVICE)
    torch.library.opcheck(torch.ops.metrix_ops.triton_hphn_pick_sims.default,
                          (x.requires_grad_(), idx, 3, True))
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    pts, best, col = _mining(labels, 2, "all", 1, False, 3)
    torch.library.opcheck(torch.ops.metrix_ops.triton_ee_side_pairs.default,
                          (best.to(DEVICE), col.to(DEVICE), pts.seg_i.to(DEVICE),
                           pts.seg_j.to(DEVICE), 6, 2, False))


_SM90 = r'''
import metrix_ops.triton.ee_side_pairs as sp
import metrix_ops.triton.pick_sims as ps

failed = []
ints = {n: "*i64" for n in ("idx_ptr", "dst_ptr", "col_ptr", "seg_i_ptr", "seg_j_ptr",
                            "ends_ptr", "off_ptr", "out_ptr")}
for fdt, acc, dt in [("fp32", tl.float32, tl.float32), ("fp64", tl.float64, tl.float64),
                     ("bf16", tl.float32, tl.bfloat16)]:
    for kernel in (ps._pick_sims_fwd_kernel, ps._pick_sims_bwd_kernel):
        for l2 in (False, True):
            consts = dict(L2_POS=l2, TINY=1.1754943508222875e-38, DT=dt, BLOCK_B=16,
                          BLOCK_D=32, ACC=acc)
            try:
                compile_sm90(kernel, consts, fdt, pointer_types=ints)
            except Exception as e:  # noqa: BLE001
                failed.append(f"{kernel.__name__} {fdt} l2={l2}: {type(e).__name__}: "
                              f"{str(e)[:300]}")
for inverted in (False, True):
    try:
        compile_sm90(sp._side_pairs_kernel, dict(INVERTED=inverted, BLOCK_S=16, NP=8), "fp32",
                     pointer_types=ints)
    except Exception as e:  # noqa: BLE001
        failed.append(f"side pairs inverted={inverted}: {type(e).__name__}: {str(e)[:300]}")
print("\n".join(failed))
sys.exit(1 if failed else 0)
'''


@compiles_only
def test_kernels_compile_for_h100():
    run_sm90_script(_SM90)
