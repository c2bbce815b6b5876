"""Fused (streaming, O(B·D)-memory) implementations of the losses, per backend.

`register(backend, loss_name, supports, impl)`: `supports(params, inp, expansion)` says
whether the fused op covers this call (else "auto" runs the reference and an explicit
backend raises); `impl(params, inp, reducer)` returns the reduced loss."""
from __future__ import annotations

from .. import backend as backend_mod

IMPLS: dict = {}


def register(backend: str, loss_name: str, supports, impl):
    IMPLS[(backend, loss_name)] = (supports, impl)
    backend_mod.FUSED[backend].add(loss_name)


def supported(backend: str, loss_name: str, params, inp, expansion) -> bool:
    entry = IMPLS.get((backend, loss_name))
    return entry is not None and entry[0](params, inp, expansion)


from . import multi_similarity  # noqa: E402,F401  (registers)
from . import triplet_margin  # noqa: E402,F401  (registers)
