"""The autograd and fake-kernel registrations of the CUDA engine's Metrix ops
(fused/cuda_metrix.py's _register_mix_op), checked without a GPU: the CUDA-only ops get
stand-in CPU kernels for the test's duration (simple functions of x with known gradients,
whose backwards assert that they receive the saved outputs and constants in the schema's
order), then gradcheck, the differentiable outputs, and opcheck. Needs a build with the CUDA
kernels compiled (as CI's), not a GPU."""
import pytest
import torch

from metrix_ops import _ext

pytestmark = pytest.mark.skipif(not _ext.HAS_CUDA_EXT,
                                reason="the CUDA Metrix ops exist only in a CUDA build")

MS = (2.0, 50.0, 0.5, 0.3, True, 7)
CON = (True, 0.1, 0.8, 0.3, False, 5)
LSE = {"circle_metrix_mix": (0.25, 80.0, 0.3, False, 4),
       "lifted_metrix_mix": (True, 0.1, 0.8, 0.3, False, 4)}


def _ms_fwd(x, y, s, z, *c):
    return (x ** 2).sum(1) * c[0], x.sum(1), x[:, 0].clone()


def _ms_bwd(g, x, y, s, z, lp, ln, *c):
    assert torch.equal(lp, x.sum(1)) and torch.equal(ln, x[:, 0]), "saved outputs"
    assert c == MS, c
    return g[:, None] * 2 * x * c[0]


def _con_fwd(x, y, s, z, *c):
    ones = torch.ones(x.shape[0], dtype=torch.long)
    return x.sum(1) * c[1], ones, (x ** 2).sum(1) * c[2], 2 * ones


def _con_bwd(gp, gn, x, y, s, z, *c):
    assert c == CON, c
    return gp[:, None] * c[1] + gn[:, None] * 2 * x * c[2]


def _lse_fwd(x, y, s, z, *c):
    return x.sum(1), (x ** 3).sum(1)


def _lse_bwd(name):
    def bwd(gp, gn, x, y, s, z, lp, ln, *c):
        assert torch.equal(lp, x.sum(1)) and torch.equal(ln, (x ** 3).sum(1)), "saved outputs"
        assert c == LSE[name], c
        return gp[:, None] * torch.ones_like(x) + gn[:, None] * 3 * x ** 2
    return bwd


@pytest.fixture
def stand_ins():
    lib = torch.library.Library("metrix_ops", "IMPL")  # dropped after the test
    lib.impl("ms_metrix_mix_fwd", _ms_fwd, "CPU")
    lib.impl("ms_metrix_mix_bwd", _ms_bwd, "CPU")
    lib.impl("contrastive_metrix_mix_fwd", _con_fwd, "CPU")
    lib.impl("contrastive_metrix_mix_bwd", _con_bwd, "CPU")
    for name in LSE:
        lib.impl(f"{name}_fwd", _lse_fwd, "CPU")
        lib.impl(f"{name}_bwd", _lse_bwd(name), "CPU")
    yield torch.ops.metrix_ops
    lib._destroy()


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, dtype=torch.float64, generator=g, requires_grad=True)
    y, start = torch.zeros(6, dtype=torch.long), torch.zeros(6, dtype=torch.long)
    return x, y, start, torch.full((6,), 6), torch.randn(6, dtype=torch.float64, generator=g)


def test_gradients_reach_the_backward_in_schema_order(stand_ins):
    ops = stand_ins
    x, y, s, z, w = _inputs()
    cases = [lambda e: ops.ms_metrix_mix_fwd(e, y, s, z, *MS)[0] * w]
    con = lambda e: ops.contrastive_metrix_mix_fwd(e, y, s, z, *CON)  # noqa: E731
    cases += [lambda e: con(e)[0] * w + con(e)[2], lambda e: con(e)[2] * w]  # one side unused
    for name, c in LSE.items():
        op = getattr(ops, f"{name}_fwd")
        cases += [lambda e, op=op, c=c: op(e, y, s, z, *c)[0] * w + op(e, y, s, z, *c)[1],
                  lambda e, op=op, c=c: op(e, y, s, z, *c)[1] * w]
    for f in cases:
        assert torch.autograd.gradcheck(f, (x,))


def test_only_the_loss_outputs_are_differentiable(stand_ins):
    ops = stand_ins
    x, y, s, z, _ = _inputs()
    assert [o.requires_grad for o in ops.ms_metrix_mix_fwd(x, y, s, z, *MS)] == [True, False, False]
    out = ops.contrastive_metrix_mix_fwd(x, y, s, z, *CON)
    assert [o.requires_grad for o in out] == [True, False, True, False]
    assert out[1].dtype == torch.long
    for name, c in LSE.items():
        assert all(o.requires_grad for o in getattr(ops, f"{name}_fwd")(x, y, s, z, *c))


def test_opcheck(stand_ins):
    ops = stand_ins
    x, y, s, z, _ = _inputs()
    torch.library.opcheck(ops.ms_metrix_mix_fwd.default, (x, y, s, z, *MS))
    torch.library.opcheck(ops.contrastive_metrix_mix_fwd.default, (x, y, s, z, *CON))
    for name, c in LSE.items():
        torch.library.opcheck(getattr(ops, f"{name}_fwd").default, (x, y, s, z, *c))
