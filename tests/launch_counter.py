"""A counter of the launches a loss call queues: the aten ops that run a kernel (not views,
not allocations, not metadata), the Triton kernels, and the compiled ops of the extension
(each one or a few kernels on a GPU). On a GPU every launch costs a few microseconds of
queueing whatever its size, so the small element-wise ops of the Python glue (input checks,
reductions, selects) add up to a per-call cost that the products do not scale away at
B = 8192; counting them on the CPU shows that cost without a GPU. Used by
tests/test_host_syncs.py and benchmarks/host_syncs.py.

A custom op written in Python (the Triton engine's launchers, registered with
torch.library.custom_op) is entered, so the ops and kernels inside it are counted; a compiled
op (`metrix_ops::*` from csrc) counts as one. The Triton interpreter's own work inside a
kernel launch is not counted. Each launch is charged to the innermost frame of the library's
own code ("autograd" when there is none: the engine's backward of a glue op)."""
from __future__ import annotations

import collections
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

PACKAGE = os.path.join(os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(
    __file__)), "..")), "metrix_ops") + os.sep

# aten ops that launch no kernel: allocations, metadata, and the reads the host-sync counter
# counts (tests/host_reads.py)
NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided",
             "detach", "detach_", "lift_fresh", "resize_", "set_", "_local_scalar_dense",
             "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "resolve_conj",
             "resolve_neg", "is_same_size", "_has_compatible_shallow_copy_type", "result_type",
             "promote_types", "_unsafe_view"}


def _site() -> str:
    f = sys._getframe(2)
    while f is not None:
        name = os.path.normpath(f.f_code.co_filename)
        if name.startswith(PACKAGE):
            return f"{os.path.relpath(name, os.path.dirname(PACKAGE.rstrip(os.sep)))}:{f.f_lineno}"
        f = f.f_back
    return "autograd"


def _python_custom_op(func):
    """The Python function behind a torch.library.custom_op, or None (a compiled op)."""
    try:
        from torch._library.custom_ops import _maybe_get_opdef
    except ImportError:  # torch without custom_op: every op is compiled
        return None
    opdef = _maybe_get_opdef(func._schema.name)
    return None if opdef is None else opdef._init_fn


class LaunchCounter(TorchDispatchMode):
    """Counts launches while active: `sites` maps 'file:line what' to a count."""

    def __init__(self):
        super().__init__()
        self.sites = collections.Counter()
        self._in_kernel = 0
        self._saved = None
        self._depth = 0  # re-entered for each Python custom op's body: patch once

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "metrix_ops":
            body = _python_custom_op(func)
            if body is not None:  # a Python launcher: count what it runs
                with self:
                    return body(*args, **kwargs)
            self.sites[f"{_site()} {func._schema.name}"] += 1
        elif not self._in_kernel and not func.is_view and \
                func.overloadpacket.__name__ not in NO_KERNEL:
            self.sites[f"{_site()} {func.overloadpacket.__name__}"] += 1
        return func(*args, **kwargs)

    def __enter__(self):
        self._depth += 1
        if self._depth > 1:
            return super().__enter__()
        try:
            import triton.runtime.interpreter as interp
        except ImportError:
            interp = None
        # every interpreted launch runs a GridExecutor (triton 3.2's InterpretedFunction has
        # no run method to hook, 3.8's does; both launch through this)
        if getattr(interp, "GridExecutor", None) is not None:
            owner = interp.GridExecutor
            orig = owner.__call__
            counter = self

            def launch(grid_exec, *a, **k):
                if not counter._in_kernel:
                    counter.sites[f"{_site()} triton:{grid_exec.fn.__name__}"] += 1
                counter._in_kernel += 1  # the interpreter's own ops are the kernel's body
                try:
                    return orig(grid_exec, *a, **k)
                finally:
                    counter._in_kernel -= 1
            self._saved = (owner, orig)
            owner.__call__ = launch
        return super().__enter__()

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth == 0 and self._saved is not None:
            owner, orig = self._saved
            owner.__call__ = orig
            self._saved = None
        return super().__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.sites.values())

    def by_kind(self) -> dict:
        """Totals of aten ops, Triton kernels and compiled ops."""
        kinds = collections.Counter()
        for key, n in self.sites.items():
            what = key.rsplit(" ", 1)[1]
            kinds["triton" if what.startswith("triton:") else
                  "compiled" if "::" in what else "aten"] += n
        return dict(kinds)


def launches_per_step(loss_fn, x0, labels) -> LaunchCounter:
    """Launches of one forward + backward (host_reads.second_step: the second of two calls,
    on fresh tensors)."""
    from host_reads import second_step
    return second_step(LaunchCounter, loss_fn, x0, labels)
