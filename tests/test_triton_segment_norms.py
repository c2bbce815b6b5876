"""triton/segment_norms.py (the norms of EE's synthetic points, one kernel each way) under
TRITON_INTERPRET=1, against the PyTorch form it replaced (written out here: three row dots
per segment, the same association), values and gradients under random upstream weights,
with duplicate and antipodal rows (a point at the origin: the clamp passes no gradient),
segments sharing rows, no segment, n = 0; opcheck; compilation for sm_90. The losses through
it are checked against the reference in test_triton_ee_losses.py."""
import pytest
import torch
import torch.nn.functional as F

from metrix_ops.ops.ee_mining import all_segments
from triton_cases import DEVICE, compiles_only, requires_triton, run_sm90_script

pytestmark = requires_triton


def torch_norms(xs, seg_u, seg_w, n):
    """‖λ x_u + (1−λ) x_w‖ per point k = 1..n of each segment, λ = k/(n+1) on the float64
    grid, √max(sq, tiny), then a trailing 1."""
    if n == 0 or len(seg_u) == 0:
        return xs.new_ones(1)
    lam = (torch.arange(1, n + 1, dtype=torch.float64) / (n + 1)).to(xs.dtype).repeat(len(seg_u))
    e = torch.arange(len(lam)) // n
    xu, xw = xs.index_select(0, seg_u), xs.index_select(0, seg_w)
    g_uu, g_uw, g_ww = ((xu * xu).sum(1)[e], (xu * xw).sum(1)[e], (xw * xw).sum(1)[e])
    mu = 1 - lam
    sq = lam * (lam * g_uu + mu * g_uw) + mu * (lam * g_uw + mu * g_ww)
    return torch.cat([sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt(), xs.new_ones(1)])


def _case(b, d, classes, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1)
    y = torch.randint(0, classes, (b,), generator=g)
    if b >= 6:
        x[3], x[5] = x[2], -x[4]  # a duplicate and an antipodal pair, each a segment
        y[2:6] = torch.tensor([0, 0, 1, 1])
    return x.to(dtype), *all_segments(y)


TOL = {torch.float64: 1e-12, torch.float32: 2e-6}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("b,d,classes,n", [(30, 17, 4, 8), (12, 5, 2, 1), (40, 200, 8, 3),
                                           (9, 4, 3, 0), (7, 3, 7, 2), (1, 3, 1, 4)])
def test_equal_torch_form_values_and_gradients(b, d, classes, n, dtype):
    from metrix_ops.triton.segment_norms import segment_norms_triton
    from metrix_ops.triton.launch import FP64_DOT
    if dtype == torch.float64 and not FP64_DOT:
        pytest.skip("the engine takes no float64 on this triton")
    for seed in range(2):
        x, si, sj = _case(b, d, classes, dtype, seed)
        outs = []
        for f in (segment_norms_triton, torch_norms):
            xs = x.to(DEVICE if f is segment_norms_triton else "cpu").clone().requires_grad_()
            out = f(xs, si.to(xs.device), sj.to(xs.device), n)
            w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed),
                            dtype=torch.float64).to(dtype)
            loss = (out * w.to(xs.device)).sum()
            if loss.requires_grad:  # (the PyTorch form's constant 1 without a segment has none)
                loss.backward()
            grad = torch.zeros_like(xs) if xs.grad is None else xs.grad
            outs.append((out.detach().cpu(), grad.cpu()))
        (got, dgot), (want, dwant) = outs
        assert got.shape == (len(si) * n + 1 if n else 1,)
        torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype])
        torch.testing.assert_close(dgot, dwant, rtol=TOL[dtype], atol=TOL[dtype])


def test_half_rows():
    from metrix_ops.triton.segment_norms import segment_norms_triton
    x, si, sj = _case(20, 16, 3, torch.float32, 0)
    for dt in (torch.bfloat16, torch.float16):
        got = segment_norms_triton(x.to(dt).to(DEVICE), si.to(DEVICE), sj.to(DEVICE), 3)
        assert got.dtype == dt
        tol = 2e-2 if dt == torch.bfloat16 else 2e-3
        torch.testing.assert_close(got.float().cpu(), torch_norms(x.to(dt).float(), si, sj, 3),
                                   rtol=tol, atol=tol)


def test_opcheck():
    from metrix_ops.triton import segment_norms  # noqa: F401  (registers the ops)
    x, si, sj = _case(11, 5, 3, torch.float64, 1)
    for n in (2, 0):
        torch.library.opcheck(torch.ops.metrix_ops.triton_segment_norms.default,
                              (x.to(DEVICE).requires_grad_(), si.to(DEVICE), sj.to(DEVICE), n))


_SM90 = r'''
import metrix_ops.triton.segment_norms as sn

failed = []
ints = {"u_ptr": "*i64", "w_ptr": "*i64", "dst_ptr": "*i64"}
for fdt, acc, dt in [("fp32", tl.float32, tl.float32), ("fp64", tl.float64, tl.float64),
                     ("bf16", tl.float32, tl.bfloat16)]:
    for kernel in (sn._norms_fwd_kernel, sn._norms_bwd_kernel):
        consts = dict(TINY=1.1754943508222875e-38, DT=dt, BLOCK_S=16, BLOCK_D=64, ACC=acc)
        try:
            compile_sm90(kernel, consts, fdt, pointer_types=ints)
        except Exception as e:  # noqa: BLE001
            failed.append(f"{kernel.__name__} {fdt}: {type(e).__name__}: {str(e)[:300]}")
print("\n".join(failed))
sys.exit(1 if failed else 0)
'''


@compiles_only
def test_kernels_compile_for_h100():
    run_sm90_script(_SM90)
