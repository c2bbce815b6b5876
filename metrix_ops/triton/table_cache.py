"""The chunk tables of the Metrix and EE kernels, handed from an op's forward to its backward.

Those tables depend on the labels' values, so building one reads them on the host: one
device sync. The forward and the backward op of a step get the same (saved) label and layout
tensors, so the forward leaves its table here and the backward takes it instead of building
it again: one host sync per step instead of two, and on a GPU no drained queue in the middle
of the backward.

An entry is keyed by its source tensors' storage address, shape, strides and version counter
(an in-place write bumps it), and holds a reference to them, so that no other tensor can take
that address while the entry lives. Only a backward op takes an entry, and it takes it away:
its label inputs are tensors its forward saved, which nothing writes to in between (a
compiled graph may reuse a dead buffer, but a saved one is not dead). A forward without a
backward (no grad) leaves an entry that ages out. Inference tensors have no version counter:
their tables are never kept."""
from __future__ import annotations

import threading
from collections import OrderedDict

_SIZE = 8  # a few losses' forward/backward pairs in flight per step
_entries: OrderedDict = OrderedDict()
_lock = threading.Lock()
stats = {"kept": 0, "taken": 0}  # for the tests


def _key(tensors, extra):
    return tuple((t.data_ptr(), t.device, t.dtype, tuple(t.shape), t.stride(), t._version)
                 for t in tensors) + (extra,)


def handed(tensors, extra, build, backward: bool):
    """build()'s table of `tensors` (and `extra`, what else it depends on): in a forward op
    built and kept; in a backward op the one its forward kept, else built."""
    if backward:
        got = _take(tensors, extra)
        return got if got is not None else build()
    value = build()
    _keep(tensors, extra, value)
    return value


def _keep(tensors, extra, value) -> None:
    if any(t.is_inference() for t in tensors):
        return
    with _lock:
        _entries[_key(tensors, extra)] = (tuple(tensors), value)
        stats["kept"] += 1
        while len(_entries) > _SIZE:
            _entries.popitem(last=False)


def _take(tensors, extra):
    """The table a forward kept for these tensors and extra (removed), else None."""
    if any(t.is_inference() for t in tensors):
        return None
    with _lock:
        hit = _entries.pop(_key(tensors, extra), None)
        if hit is None:
            return None
        stats["taken"] += 1
        return hit[1]


def clear() -> None:
    with _lock:
        _entries.clear()
