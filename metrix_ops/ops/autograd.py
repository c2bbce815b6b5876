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
schemas have no defaults to fill), `ctx.needs_input_grad` indexed by them. Inside one
torch.func transform (grad, vjp) `call` takes a second plain Function in the form those
require (a separate setup_context), which torch's generated one does not have. Every
backward is once differentiable: a second derivative raises, naming the op."""
from __future__ import annotations

import functools

import torch

_FORMULAS: dict = {}  # "metrix_ops::name" -> (its _Eager subclass, setup_context, backward)


def _any_requires_grad(*args) -> bool:
    return any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


# torch's own test, in C++ (what torch's generated Function uses), where this torch has it
_any_requires_grad = getattr(torch._C, "_any_requires_grad", _any_requires_grad)


class _NoSecondDerivative(torch.autograd.Function):
    """The gradients a backward returned, as they are, in a graph node that raises when
    differentiated: its inputs are those gradients and the backward's saved tensors, so a
    gradient of the gradients w.r.t. anything the op saw reaches it."""

    @staticmethod
    def forward(ctx, message, n, *tensors):
        ctx.message = message
        return tuple(t.view_as(t) for t in tensors[:n])

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(ctx.message)


def once_differentiable(backward, name: str):
    """The backward run without a graph (the backward ops have no derivative of their own).
    Under create_graph=True its gradients come out of a node that raises if differentiated,
    naming the op: without it a gradient penalty's second derivative through a fused loss
    was silently zero, and some backward ops failed on inputs needing a gradient.
    (torch.autograd.function.once_differentiable ties its error node to fresh leaves, so a
    gradient taken w.r.t. the embeddings never reaches it: "not used in the graph".)"""
    message = (f"{name} has no second derivative: gradients of gradients (create_graph=True "
               "then a second backward, nested torch.func transforms) are not supported by the "
               "fused losses; backend='reference' has them")

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        # the usual backward (create_graph=False), and a compiled one: AOTAutograd has no
        # double backward of its own (and dynamo need not trace the functorch test below)
        if not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return backward(ctx, *grads)
        with torch.no_grad():
            got = backward(ctx, *grads)
        # inside one torch.func transform, whose backward keeps a graph that nothing
        # differentiates (a nested one is refused at the forward: check_one_transform)
        if torch._C._are_functorch_transforms_active():
            return got
        outs = got if isinstance(got, tuple) else (got,)
        kept = [o for o in outs if isinstance(o, torch.Tensor)]
        tied = [t for t in (*grads, *ctx.saved_tensors)
                if isinstance(t, torch.Tensor) and t.requires_grad]
        if not kept or not tied:
            return got
        marked = iter(_NoSecondDerivative.apply(message, len(kept), *kept, *tied))
        marked = tuple(next(marked) if isinstance(o, torch.Tensor) else o for o in outs)
        return marked if isinstance(got, tuple) else marked[0]

    return wrapper


def register_autograd(name: str, backward, setup_context,
                      differentiable_backward: bool = False) -> None:
    """torch.library.register_autograd(name, ...), and the same formulas for `call`; the
    backward once differentiable either way, unless it is made of differentiable PyTorch
    ops (differentiable_backward: sim_row_stats'), whose graph then gives the second
    derivative."""
    if not differentiable_backward:
        backward = once_differentiable(backward, name)
    torch.library.register_autograd(name, backward, setup_context=setup_context)
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
        if not isinstance(got, tuple):
            return got, None
        # a Tensor[] argument (the Triton EE ops' layout tables) is one input here, where
        # torch's generated Function unpacks it: its formula's list of Nones becomes one None
        return (*(None if isinstance(g, list) and not any(v is not None for v in g) else g
                  for g in got), None)


def check_one_transform(name: str) -> None:
    """Inside torch.func transforms, refuses more than one level (grad of grad, vmap of grad):
    the ops have one derivative and no batching rule."""
    if torch._C._functorch.maybe_current_level() > 1:
        raise RuntimeError(
            f"{name}: one torch.func transform at a time (grad, vjp) is supported by the fused "
            "losses; nested ones (grad of grad, vmap or jacrev of grad) need backend='reference'")


class _ForTransforms(torch.autograd.Function):
    # the same in the form torch.func's transforms (grad, vjp) require, a separate
    # setup_context, taken only while one is active. torch's generated Function has the
    # one-step form, so a bare op call fails there. No vmap rule: the ops have none.
    @staticmethod
    def forward(*args):
        op = args[-1][0]
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args[:-1])

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, setup_context, backward = inputs[-1][1]
        setup_context(ctx, inputs[:-1], output)
        ctx.formula = backward

    backward = staticmethod(_Eager.backward)


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
            if torch._C._are_functorch_transforms_active():
                check_one_transform(name)
                return _ForTransforms.apply(*args, (op, formulas))
            return formulas[0].apply(*args, (op, formulas))
    return op(*args)  # and torch's registered autograd, if any
