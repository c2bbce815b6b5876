"""ops/autograd.py: the fused ops' registered formulas run through one plain autograd.Function
in eager mode (`call`), and through torch's generated one for a direct op call and under
torch.compile. Both must give the same values and gradients (the same formulas, the same
ctx), with the second input's gradient taken or not (needs_input_grad indexed by the op's
arguments: test_fused_ntxent_cpu.py's spy checks that the backward op is told), and leave
calls without a gradient as the bare op."""
import pytest
import torch
import torch.nn.functional as F

from metrix_ops import _ext
from metrix_ops.ops import autograd as ag

pytestmark = pytest.mark.skipif(not _ext.HAS_EXT, reason="needs the compiled extension")


def unit(b, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1)


def labels(b, classes, seed):
    return torch.randint(0, classes, (b,), generator=torch.Generator().manual_seed(seed))


# (op, its arguments after the differentiable ones, how many leading inputs are rows)
CASES = {
    "ms_loss_self_fwd": lambda y, ry: ((y, 2.0, 40.0, 0.5, 5), 1),
    "ms_loss_fwd": lambda y, ry: ((y, ry, False, 2.0, 40.0, 0.5, 3), 2),
    "contrastive_fwd": lambda y, ry: ((y, ry, False, True, 0.8, 0.3, 0.0, 1e30, 4), 2),
    "ntxent_fwd": lambda y, ry: ((y, ry, False, 0.1, -1e30, 1e30, 5), 2),
    "triplet_all_fwd": lambda y, ry: ((y, ry, False, True, 0.1, 4), 2),
}


def run(op_name, via_call, r_grad, b=11, m=7, d=6):
    x, r = unit(b, d, 1).requires_grad_(), unit(m, d, 2).requires_grad_(r_grad)
    y, ry = labels(b, 3, 3), labels(m, 3, 4)
    rest, n_rows = CASES[op_name](y, ry)
    op = getattr(torch.ops.metrix_ops, op_name)
    args = ((x,) if n_rows == 1 else (x, r)) + rest
    out = ag.call(op, *args) if via_call else op(*args)
    out = out if isinstance(out, tuple) else (out,)
    w = torch.linspace(0.5, 1.5, out[0].numel(), dtype=out[0].dtype).view_as(out[0])
    wanted = [x] + ([r] if n_rows == 2 and r_grad else [])
    grads = torch.autograd.grad((out[0] * w).sum(), wanted)
    return out, grads


@pytest.mark.parametrize("r_grad", [True, False])
@pytest.mark.parametrize("op_name", sorted(CASES))
def test_call_equals_the_registered_autograd(op_name, r_grad):
    out_c, grads_c = run(op_name, True, r_grad)
    out_t, grads_t = run(op_name, False, r_grad)
    assert out_c[0].grad_fn.name() == f"Eager_metrix_ops_{op_name}Backward"
    assert type(out_t[0].grad_fn).__name__.startswith("GeneratedBackwardFor_metrix_ops")
    for a, b in zip(out_c, out_t):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert len(grads_c) == len(grads_t)
    for a, b in zip(grads_c, grads_t):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_without_a_gradient_the_bare_op_runs():
    x = unit(5, 4, 0)
    y = labels(5, 2, 0)
    rows, _, _ = ag.call(torch.ops.metrix_ops.ms_loss_self_fwd, x, y, 2.0, 40.0, 0.5, 8)
    assert rows.grad_fn is None
    with torch.no_grad():
        rows, _, _ = ag.call(torch.ops.metrix_ops.ms_loss_self_fwd, x.requires_grad_(), y, 2.0,
                             40.0, 0.5, 8)
    assert rows.grad_fn is None


def test_every_formula_is_registered_with_torch():
    """What `call` runs in eager is what torch runs for the op elsewhere: each kept formula's
    op has torch's autograd kernel, and the package's CPU loss ops all have a formula."""
    import metrix_ops.fused  # noqa: F401  (imports every op module)
    assert len(ag._FORMULAS) >= 30
    for name in ag._FORMULAS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "Autograd"), name
    for name in ("ms_loss_self_fwd", "contrastive_self_fwd", "proxy_anchor_fwd", "ntxent_fwd",
                 "triplet_all_fwd", "circle_self_fwd", "lifted_self_fwd", "proxy_nca_fwd"):
        assert f"metrix_ops::{name}" in ag._FORMULAS, name


def test_under_fullgraph_compile_the_registered_op_runs():
    """Inside torch.compile `call` is the bare op (dynamo traces no autograd.Function and no
    C requires_grad test): one graph, and the gradient of torch's registration."""
    x, y = unit(9, 5, 6), labels(9, 3, 6)

    def f(t):
        rows = ag.call(torch.ops.metrix_ops.ms_loss_self_fwd, t, y, 2.0, 40.0, 0.5, 4)[0]
        return (rows * torch.arange(1.0, 10.0, dtype=t.dtype)).sum()

    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.compile(f, fullgraph=True, backend="eager")(a).backward()
    f(b).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)
