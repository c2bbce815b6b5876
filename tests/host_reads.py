"""A counter of host syncs: the reads of tensor data (and the ops whose output shape depends
on the data) that the library's Python glue makes while it is active. On CUDA tensors each one
waits for the GPU queue to drain; the glue is the same Python on CPU and CUDA tensors, so
counting on the CPU tells what a GPU run will wait on. Used by tests/test_host_syncs.py and
benchmarks/host_syncs.py.

Counted: `_local_scalar_dense` (item, bool, int, float of a tensor), `nonzero` (torch.where
with one argument, boolean indexing), `unique`, `masked_select`, `repeat_interleave` without
`output_size`, `bincount` (CUDA's reads the labels' min and max), `equal`, `is_nonzero`,
boolean-mask `index`/`index_put`, and the methods `tolist`, `cpu`, `numpy`, `item`,
`__bool__`, `__int__`, `__float__`, `__index__`. A read is charged to the innermost frame of
the library's own code; reads made by the Triton interpreter itself (it copies every kernel
argument to NumPy) and by the caller are not counted. The aten ops are seen by a dispatch mode,
which does not look inside a custom op's implementation (a launcher registered with
torch.library); the methods, and `nonzero` and `unique` as functions and methods, are
patched, so they are seen there too."""
from __future__ import annotations

import collections
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
PACKAGE = os.path.join(ROOT, "metrix_ops") + os.sep
# library functions whose reads are of host tensors on any device: Metrix's λ is drawn from
# the global CPU generator
HOST_SIDE = {"draw_lam"}

# aten ops that read tensor data on the host (or size their output from it)
SYNC_OPS = {"_local_scalar_dense", "nonzero", "_unique2", "unique_dim", "unique_consecutive",
            "masked_select", "bincount", "equal", "is_nonzero"}
SYNC_METHODS = ("tolist", "cpu", "numpy", "item", "__bool__", "__int__", "__float__",
                "__index__", "nonzero", "unique")
SYNC_FUNCTIONS = ("nonzero", "unique")  # torch.<name>, as called inside custom ops


def _site():
    """'file:line' of the innermost library frame, or None when the read is not the
    library's (the Triton interpreter's, or the caller's)."""
    f = sys._getframe(2)
    while f is not None:
        name = os.path.normpath(f.f_code.co_filename)
        if os.sep + "triton" + os.sep in name and PACKAGE not in name:
            return None  # inside the Triton package: the interpreter's own copies
        # host_read.py only performs a read for its caller: charge the caller
        if name.startswith(PACKAGE) and not name.endswith(os.sep + "host_read.py"):
            if f.f_code.co_name in HOST_SIDE:
                return None
            return f"{os.path.relpath(name, ROOT)}:{f.f_lineno}"
        f = f.f_back
    return None


def _bool_index(args) -> bool:
    idx = args[1] if len(args) > 1 else ()
    return any(torch.is_tensor(t) and t.dtype in (torch.bool, torch.uint8) for t in idx or ())


class SyncCounter(TorchDispatchMode):
    """Counts the host reads made by the library while active (a dispatch mode for the
    aten ops, patched Tensor methods for the reads that do not dispatch on CPU tensors)."""

    def __init__(self):
        super().__init__()
        self.sites = collections.Counter()
        self._saved = {}
        self._in_method = 0  # inside a patched method: its own _local_scalar_dense is not new

    def _hit(self, what):
        site = _site()
        if site is not None:
            self.sites[f"{site} {what}"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if self._in_method:
            pass
        elif (name in SYNC_OPS
                or (name == "repeat_interleave" and (kwargs or {}).get("output_size") is None
                    and torch.is_tensor(args[0]) and func._overloadname != "self_int")
                or (name in ("index", "index_put", "index_put_") and _bool_index(args))):
            self._hit(name)
        return func(*args, **(kwargs or {}))

    def _patch(self, owner, name):
        orig = self._saved[(owner, name)] = getattr(owner, name)

        def patched(*a, **k):
            self._hit(name)
            self._in_method += 1  # what it dispatches is this one read
            try:
                return orig(*a, **k)
            finally:
                self._in_method -= 1
        setattr(owner, name, patched)

    def __enter__(self):
        for m in SYNC_METHODS:
            self._patch(torch.Tensor, m)
        for f in SYNC_FUNCTIONS:
            self._patch(torch, f)
        return super().__enter__()

    def __exit__(self, *exc):
        for (owner, name), orig in self._saved.items():
            setattr(owner, name, orig)
        self._saved.clear()
        return super().__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.sites.values())


def second_step(make_counter, loss_fn, x0, labels):
    """A counter (make_counter()) of the second of two forward + backward calls (the first
    compiles the kernels); fresh tensors for each, as in training, so no cache keyed by them
    carries over."""
    for _ in range(2):
        x, y = x0.clone().requires_grad_(), labels.clone()
        counter = make_counter()
        with counter:
            loss_fn(x, y).backward()
    return counter


def reads_per_step(loss_fn, x0, labels):
    """Host reads of one forward + backward (second_step)."""
    return second_step(SyncCounter, loss_fn, x0, labels)
