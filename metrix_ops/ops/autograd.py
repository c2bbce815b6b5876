"""The fused ops' autograd, registered once and run two ways from the same formulas.

`register_autograd(name, backward, setup_context)` registers them with
torch.library.register_autograd (what torch.compile, opcheck and a direct
`torch.ops.metrix_ops.*` call use) and keeps them for `call`. `call(op, *args)` runs the op:
- in eager mode with a gradient to take, through one plain autograd.Function that calls the
  op below the autograd key and then the same setup_context and backward. torch's generated
  Function around a registered op costs ~20 µs a call forward (binding the schema's defaults
  in Python, a Python redispatch) and ~25 µs backward (checks of the returned gradients), as
  much as a small batch's whole op on the CPU, and a GPU run pays it on the host per launch;
- under torch.compile (and wherever no input needs a gradient), as the op itself: the traced
  graph holds the registered op, whose autograd torch derives from the registration.
The formulas see the same ctx either way: inputs as the op's positional arguments (the
schemas have no defaults to fill), `ctx.needs_input_grad` indexed by them."""
from __future__ import annotations

import torch

_FORMULAS: dict = {}  # "metrix_ops::name" -> (its _Eager subclass, setup_context, backward)


def _any_requires_grad(*args) -> bool:
    return any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


# torch's own test, in C++ (what torch's generated Function uses), where this torch has it
_any_requires_grad = getattr(torch._C, "_any_requires_grad", _any_requires_grad)


def _takes_tensor_lists(name: str) -> bool:
    ns, op = name.split("::")
    schema = getattr(getattr(torch.ops, ns), op).default._schema
    return any("Tensor" in str(a.type) and str(a.type) != "Tensor"
               and "List" in str(a.type) for a in schema.arguments)


def register_autograd(name: str, backward, setup_context) -> None:
    """torch.library.register_autograd(name, ...), and the same formulas for `call`, except
    for an op with a Tensor[] argument (some Triton EE ops' layout tables): a plain
    Function sees a list as one opaque input, where torch's generated one unpacks it, so
    those keep torch's path."""
    torch.library.register_autograd(name, backward, setup_context=setup_context)
    if _takes_tensor_lists(name):
        return
    # a class per op, so that its graph nodes name it ("Eager_metrix_ops_<op>Backward"), as
    # torch's generated ones do: the profiler, anomaly mode and the tests read it
    fn = type("Eager_" + name.replace("::", "_"), (_Eager,), {})
    _FORMULAS[name] = (fn, setup_context, backward)


class _Eager(torch.autograd.Function):
    # forward(ctx, ...) rather than forward + setup_context: apply skips binding a signature.
    # The formulas ride as the last argument, after the op's own, so that needs_input_grad[i]
    # is the op's argument i, as in torch's generated Function.
    @staticmethod
    def forward(ctx, *args):
        op, (_, setup_context, backward) = args[-1]
        inputs = args[:-1]
        with torch._C._AutoDispatchBelowAutograd():
            out = op(*inputs)
        setup_context(ctx, inputs, out)
        ctx.formula = backward
        return out

    @staticmethod
    def backward(ctx, *grads):
        got = ctx.formula(ctx, *grads)
        return (*got, None) if isinstance(got, tuple) else (got, None)


def call(op, *args):
    """op(*args) with the registered autograd: a plain autograd.Function in eager mode when
    some input needs a gradient, the op itself otherwise (see the module's doc)."""
    # is_compiling first: dynamo cannot trace the C test of requires_grad (a graph break)
    if (not torch.compiler.is_compiling() and torch.is_grad_enabled()
            and _any_requires_grad(*args)):
        # an OpOverloadPacket (torch.ops.metrix_ops.x) or an OpOverload (.default); anything
        # else (a test's spy) is called as it is
        name = getattr(op, "_qualified_op_name", None) or getattr(op, "_name", None)
        formulas = _FORMULAS.get(name)
        if formulas is not None:
            return formulas[0].apply(*args, (op, formulas))
    return op(*args)  # and torch's registered autograd, if any
