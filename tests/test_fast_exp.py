"""The fp32 exp of the fused CPU kernels (csrc/common/fast_exp.h) at every SIMD level this
CPU has: ulp error against float64 exp over a dense sweep of the whole range, std::exp's
edge cases, and the flush of would-be subnormal results to 0."""
import contextlib
import math
import os

import pytest
import torch

from metrix_ops import _ext

pytestmark = pytest.mark.skipif(not _ext.HAS_EXT, reason="extension not built")

LN_FLT_MAX = math.log(torch.finfo(torch.float32).max)
LN_FLT_MIN = math.log(torch.finfo(torch.float32).tiny)


@contextlib.contextmanager
def simd_level(level):
    """METRIX_OPS_SIMD=level for the duration (the ops read it on every call)."""
    old = os.environ.get("METRIX_OPS_SIMD")
    os.environ["METRIX_OPS_SIMD"] = level
    try:
        yield
    finally:
        if old is None:
            del os.environ["METRIX_OPS_SIMD"]
        else:
            os.environ["METRIX_OPS_SIMD"] = old


def simd_levels():
    """The levels the kernels can be forced to on this CPU (auto picks avx2 where it is one)."""
    out = []
    for level in ("avx512", "avx2", "baseline") if _ext.HAS_EXT else ():
        try:
            with simd_level(level):
                torch.ops.metrix_ops._simd_level()
            out.append(level)
        except RuntimeError:  # this CPU lacks it
            pass
    return out


LEVELS = simd_levels()


def fast_exp(x, level):
    with simd_level(level):
        return torch.ops.metrix_ops._exp_f32(x)


@pytest.mark.parametrize("level", LEVELS)
def test_level_is_reported(level):
    with simd_level(level):
        assert torch.ops.metrix_ops._simd_level() == level


@pytest.mark.parametrize("unset", ["", "auto"])
def test_auto_takes_the_widest_level(unset):
    # avx512 where the CPU has it: the row kernels mask one comparison at a time, which GCC
    # keeps vector code at 16 lanes (csrc/cpu/ms_simd.cpp, default_level)
    with simd_level(unset):
        got = torch.ops.metrix_ops._simd_level()
    assert got == LEVELS[0]


def test_unknown_level_is_an_error():
    with simd_level("sse9"), pytest.raises(RuntimeError, match="METRIX_OPS_SIMD"):
        torch.ops.metrix_ops._simd_level()


@pytest.mark.parametrize("level", LEVELS)
def test_ulp_error_over_the_range(level):
    # every float from the flush threshold to the overflow one would be 2^31 values; a dense
    # sweep (odd count: every lane position and the scalar tail see values) stands in for it
    x = torch.linspace(LN_FLT_MIN, LN_FLT_MAX, 4_000_001, dtype=torch.float64).float()
    x = x[(x.double() >= LN_FLT_MIN) & (x.double() <= LN_FLT_MAX)]
    got = fast_exp(x, level).double()
    want = torch.exp(x.double())
    _, e = torch.frexp(want.float())  # float32 ulp of the true value: 2^(e − 24)
    ulp = torch.ldexp(torch.ones_like(want), e.to(torch.int64) - 24)
    err = ((got - want).abs() / ulp).max().item()
    assert err <= 2.0, f"max error {err:.3f} ulp"
    # near 0, where MS arguments concentrate, it is as good as torch's own float32 exp
    small = torch.linspace(-1, 1, 100_003)
    torch.testing.assert_close(fast_exp(small, level), torch.exp(small), rtol=2.5e-7, atol=0)


@pytest.mark.parametrize("level", LEVELS)
def test_edge_cases(level):
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([0.0, -0.0, 1.0, -1.0, inf, -inf, nan, 88.8, 1e30, -1e30, -100.0,
                      -87.34, 88.72, -87.33])
    got = fast_exp(x, level)
    assert got[0] == 1 and got[1] == 1
    assert torch.isposinf(got[4]) and got[5] == 0 and torch.isnan(got[6])
    assert torch.isposinf(got[7]) and torch.isposinf(got[8])  # overflow as std::exp
    assert got[9] == 0 and got[10] == 0  # huge negative → 0
    assert got[11] == 0  # e^−87.34 is subnormal in float32: flushed
    torch.testing.assert_close(got[[2, 3, 12, 13]], torch.exp(x[[2, 3, 12, 13]]), rtol=3e-7, atol=0)
    assert torch.isfinite(got[12]) and got[13] >= torch.finfo(torch.float32).tiny


@pytest.mark.parametrize("level", LEVELS)
def test_no_subnormal_results_and_any_length(level):
    # results below FLT_MIN are 0, never subnormal; every length exercises the tail handling
    for n in (1, 3, 4, 7, 8, 15, 16, 17, 33):
        x = torch.linspace(-104, -80, n)
        got = fast_exp(x, level)
        want = torch.exp(x.double())
        assert ((got == 0) | (got >= torch.finfo(torch.float32).tiny)).all()
        keep = want >= torch.finfo(torch.float32).tiny
        assert (got[~keep] == 0).all()
        torch.testing.assert_close(got[keep].double(), want[keep], rtol=3e-7, atol=0)
    assert fast_exp(torch.empty(0), level).numel() == 0


def test_noncontiguous_and_shape():
    x = torch.linspace(-5, 5, 60).reshape(6, 10).t()
    got = torch.ops.metrix_ops._exp_f32(x)
    assert got.shape == x.shape
    torch.testing.assert_close(got, torch.exp(x), rtol=3e-7, atol=0)


def mix_exp2(x, level):
    with simd_level(level):
        return torch.ops.metrix_ops._exp2_mix_f32(x)


@pytest.mark.parametrize("level", LEVELS)
def test_mix_exp2_error_over_its_range(level):
    # the Metrix-MS kernels' 2^y (ms_metrix_kernels.h: exp2_mix) on its whole range [−126, 127]
    # (a dense sweep of odd length: every lane position and the tail see values), and near 0
    y = torch.cat([torch.linspace(-126, 127, 2_000_003), torch.linspace(-2, 2, 100_001)])
    got = mix_exp2(y, level).double()
    want = torch.exp2(y.double())
    _, e = torch.frexp(want.float())
    ulp = torch.ldexp(torch.ones_like(want), e.to(torch.int64) - 24)
    err = ((got - want).abs() / ulp).max().item()
    assert err <= 3.0, f"max error {err:.3f} ulp"  # measured: 2.03 (AVX), 2.17 (baseline)
    assert (mix_exp2(torch.arange(-126.0, 128.0), level) == torch.exp2(torch.arange(-126.0, 128.0))).all()


@pytest.mark.parametrize("level", LEVELS)
def test_mix_exp2_clamps_to_normal_numbers(level):
    # outside [−126, 127] the value is the bound's: never 0, inf or subnormal (the fold's
    # sums detect a clamped top term by size, ms_metrix_kernels.h); NaN gives the bottom
    tiny, top = 2.0**-126, 2.0**127
    x = torch.tensor([-126.5, -200.0, -1e30, -float("inf"), 127.25, 300.0, float("inf"),
                      float("nan")])
    got = mix_exp2(x, level).tolist()
    assert got == [tiny, tiny, tiny, tiny, top, top, top, tiny]
    for n in (1, 3, 7, 15, 17, 33):  # every tail length
        y = torch.linspace(-3, 3, n)
        torch.testing.assert_close(mix_exp2(y, level), torch.exp2(y), rtol=3e-7, atol=0)
    assert mix_exp2(torch.empty(0), level).numel() == 0
