"""The fp32 Metrix kernels of the fused MS and contrastive ops (csrc/cpu/ms_metrix_kernels.h,
contrastive_metrix_kernels.h) at every SIMD level this CPU has, against the same ops in
float64 (which the loss tests hold to the reference): the fold's and the weights' own exp
(exp_mix, about 3 ulp), the lanes' tails, and the class tiles of both sides of a block
(several blocks, so the column side's gathered tiles are walked too)."""
import pytest
import torch
import torch.nn.functional as F

from metrix_ops import _ext
from test_fast_exp import simd_level, simd_levels

pytestmark = pytest.mark.skipif(not _ext.HAS_EXT, reason="extension not built")


def batch(seed, n=150, d=20, classes=19):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, dtype=torch.float64, generator=g), dim=1)
    y = torch.randint(0, classes, (n,), generator=g).sort().values
    w = torch.rand(8, n, dtype=torch.float64, generator=g)
    return x, y, w


def value_and_grad(fn, x, w):
    """Σ_k w_k · (differentiable output k) and its gradient in x, in float64."""
    e = x.clone().requires_grad_(True)
    v = sum((o.double() * wk).sum() for o, wk in zip(fn(e), w))
    (gx,) = torch.autograd.grad(v, e)
    return v.detach(), gx.double()


def ms(y, lam, anchor_neg, block):
    # rows and mixed rows (the log normalisers are not differentiable outputs)
    return lambda e: torch.ops.metrix_ops.ms_metrix_self_fwd(
        e, y, 2.0, 50.0, 0.5, lam, anchor_neg, block)[0::3]


def con(y, cosine, lam, anchor_neg, block):
    # the four sums (the counts are integers)
    inf = float("inf")
    return lambda e: torch.ops.metrix_ops.contrastive_metrix_self_fwd(
        e, y, cosine, 0.1 if cosine else 0.3, 0.5 if cosine else 1.1, -inf, inf, lam,
        anchor_neg, block)[0::2]


@pytest.mark.parametrize("level", simd_levels() + ["auto"])
@pytest.mark.parametrize("op", ["ms", "ms_anchor_neg", "con_l2", "con_cos"])
@pytest.mark.parametrize("block", [40, 1024])
def test_fp32_kernels_match_fp64(level, op, block):
    x, y, w = batch(block + len(op))
    fn = {"ms": ms(y, 0.35, False, block), "ms_anchor_neg": ms(y, 0.7, True, block),
          "con_l2": con(y, False, 0.4, False, block),
          "con_cos": con(y, True, 0.6, False, block)}[op]
    v64, g64 = value_and_grad(fn, x, w)
    with simd_level(level):
        v32, g32 = value_and_grad(fn, x.float(), w.float())
    assert g64.abs().max() > 0
    torch.testing.assert_close(v32, v64, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(g32, g64, rtol=2e-4, atol=2e-5 * g64.abs().max().item())


@pytest.mark.skipif("avx512" not in simd_levels(), reason="the CPU lacks AVX-512")
@pytest.mark.parametrize("block", [40, 1024])
def test_auto_takes_16_lane_ms_metrix_kernels(block):
    # on an AVX-512 CPU the default runs MS's row kernels and its Metrix kernels at 16 lanes
    # (ms_simd.cpp, default_level): MS's clean and mixed rows and its gradient are the AVX-512
    # kernels' bit for bit (the AVX2 ones sum in another order), and so are contrastive's
    # Metrix sums
    x, y, w = batch(block + 7)
    x = x.float()

    def run(level, fn):
        with simd_level(level):
            e = x.clone().requires_grad_(True)
            out = fn(e)
            (g,) = torch.autograd.grad(sum((o * wk.float()).sum() for o, wk in zip(out, w)), e)
            return [o.detach() for o in out], g

    def grad_of_mix(fn):  # only the mixed rows carry gradient
        return lambda e: [fn(e)[1]]

    f = ms(y, 0.35, False, block)
    (rows, mix), _ = run("auto", f)
    (rows16, mix16), _ = run("avx512", f)
    (rows8, _), _ = run("avx2", f)
    assert torch.equal(rows, rows16) and torch.equal(mix, mix16) and not torch.equal(rows, rows8)
    _, g = run("auto", grad_of_mix(f))
    _, g16 = run("avx512", grad_of_mix(f))
    _, g8 = run("avx2", grad_of_mix(f))
    assert torch.equal(g, g16) and not torch.equal(g, g8)
    c = con(y, False, 0.4, False, block)
    assert all(torch.equal(a, b) for a, b in zip(run("auto", c)[0], run("avx512", c)[0]))


@pytest.mark.skipif("avx512" not in simd_levels(), reason="the CPU lacks AVX-512")
@pytest.mark.parametrize("loss,metrix", [("CircleLoss", True),
                                         ("GeneralizedLiftedStructureLoss", True),
                                         ("MultiSimilarityLoss", False)])
def test_auto_takes_16_lane_kernels(loss, metrix):
    # on an AVX-512 CPU the default runs Circle's and GeneralizedLifted's Metrix kernels
    # (lse_mix_simd.cpp) and MS's clean row kernels (ms_simd.cpp) at 16 lanes: the loss and
    # its gradient are the avx512 level's bit for bit (the avx2 kernels sum in another
    # order, so they would show in the bits). 45 rows: a tail of lanes at every width
    import metrix_ops as mo
    g = torch.Generator().manual_seed(11)
    x = torch.randn(45, 24, generator=g)
    y = torch.randint(0, 7, (45,), generator=g)
    fn = getattr(mo.losses, loss)(backend="cpu", metrix=mo.Metrix(lam=0.35) if metrix else None)

    def run(level):
        with simd_level(level):
            e = x.clone().requires_grad_(True)
            v = fn(e, y)
            (gx,) = torch.autograd.grad(v, e)
        return v.detach(), gx

    (va, ga), (v16, g16), (v8, g8) = run("auto"), run("avx512"), run("avx2")
    assert torch.equal(va, v16) and torch.equal(ga, g16) and not torch.equal(ga, g8)
    torch.testing.assert_close(v8, v16, rtol=1e-5, atol=1e-6)  # the same loss at 8 lanes
