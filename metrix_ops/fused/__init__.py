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


MEMORY_IMPLS: dict = {}


def register_memory(backend: str, loss_name: str, impl):
    """`impl(loss_module, emb, labels, mem_emb, mem_labels, exclude_start)` computes the loss of
    the batch against a CrossBatchMemory bank in which anchor i's own slot is
    (exclude_start + i) mod len(bank) (not a positive), or returns None if it cannot."""
    MEMORY_IMPLS[(backend, loss_name)] = impl


def run_with_memory(loss, emb, labels, mem_emb, mem_labels, exclude_start: int):
    """The streaming path of CrossBatchMemory, or None where no fused op covers the call."""
    try:
        chosen = backend_mod.resolve(loss.backend, loss.loss_name, emb.device)
    except NotImplementedError:
        return None
    impl = MEMORY_IMPLS.get((chosen, loss.loss_name))
    return None if impl is None else impl(loss, emb, labels, mem_emb, mem_labels, exclude_start)


from . import multi_similarity  # noqa: E402,F401  (registers)
from . import contrastive  # noqa: E402,F401  (registers)
from . import triplet_margin  # noqa: E402,F401  (registers)
