"""Fused (streaming, O(B·D)-memory) implementations of the losses, per backend.

`register(backend, loss_name, supports, impl)`: `supports(params, inp, expansion)` says
whether the fused op covers this call (else "auto" runs the reference and an explicit
backend raises); `impl(params, inp, reducer)` returns the reduced loss."""
from __future__ import annotations

import torch

from .. import backend as backend_mod

IMPLS: dict = {}
# (backend, loss) -> (supports(params, inp, expansion, metrix), impl(params, inp, reducer,
# metrix, lam)): ops that compute the clean loss and its embedding-level Metrix term together
METRIX_IMPLS: dict = {}


def register(backend: str, loss_name: str, supports, impl):
    IMPLS[(backend, loss_name)] = (supports, impl)
    backend_mod.FUSED[backend].add(loss_name)


# (backend, loss) -> (supports(params, inp, miner), impl(params, inp, reducer, miner)): ops
# that run the loss option miner= inside (no index tuple)
MINER_IMPLS: dict = {}


def register_miner(backend: str, loss_name: str, supports, impl):
    MINER_IMPLS[(backend, loss_name)] = (supports, impl)


def keeps_call_stats(miner) -> bool:
    """A miner that records PML's per-call statistics of the distances it mines
    (collect_stats=True on a TripletMarginMiner or a BatchHardMiner, ours or PML's) runs as
    PML's two calls, where it sees them. Its counts alone (every miner's) the fused ops
    give. Inside torch.compile nothing is recorded, and the fused op keeps the graph whole."""
    if not getattr(miner, "collect_stats", False) or torch.compiler.is_compiling():
        return False
    names = {c.__name__ for c in type(miner).__mro__}
    return bool(names & {"TripletMarginMiner", "BatchHardMiner", "BatchEasyHardMiner"})


def miner_supported(backend: str, loss_name: str, params, inp, miner) -> bool:
    if keeps_call_stats(miner):
        return False
    entry = MINER_IMPLS.get((backend, loss_name))
    return entry is not None and entry[0](params, inp, miner)


def register_metrix(backend: str, loss_name: str, supports, impl):
    METRIX_IMPLS[(backend, loss_name)] = (supports, impl)


def metrix_supported(backend: str, loss_name: str, params, inp, expansion, metrix) -> bool:
    entry = METRIX_IMPLS.get((backend, loss_name))
    return entry is not None and entry[0](params, inp, expansion, metrix)


# (backend, loss) -> (supports(params, inp, expansion), impl(params, inp, reducer,
# expansion=)): ops for Embedding Expansion calls (expansion= given), apart from the clean op
EXPANSION_IMPLS: dict = {}
# (backend, loss) -> (supports(params, inp, expansion), impl(params, inp, reducer)): ops for
# calls with an indices_tuple (the loss over the given pairs or triplets only)
INDICES_IMPLS: dict = {}


def register_expansion(backend: str, loss_name: str, supports, impl):
    EXPANSION_IMPLS[(backend, loss_name)] = (supports, impl)


def register_indices(backend: str, loss_name: str, supports, impl):
    INDICES_IMPLS[(backend, loss_name)] = (supports, impl)


def impl_for(backend: str, loss_name: str, params, inp, expansion):
    """The fused impl covering this call, or None: the loss's own op when its supports()
    accepts the call, else the expansion / indices_tuple op registered for it."""
    tables = [IMPLS]
    if expansion is not None:
        tables.append(EXPANSION_IMPLS)
    if inp.indices_tuple is not None:
        tables.append(INDICES_IMPLS)
    for table in tables:
        entry = table.get((backend, loss_name))
        if entry is not None and entry[0](params, inp, expansion):
            return entry[1]
    return None


def supported(backend: str, loss_name: str, params, inp, expansion) -> bool:
    return impl_for(backend, loss_name, params, inp, expansion) is not None


def run_with_memory(loss, emb, labels, mem_emb, mem_labels, exclude_start: int):
    """CrossBatchMemory's streaming path: the loss of the batch against the bank, where anchor
    i's own bank slot (exclude_start + i) mod len(bank) is not a pair; None where no fused op
    covers the call. Rolling the bank by -exclude_start puts that slot at column i, which is
    the self-pair rule every fused op already has (same_set: row i skips column i)."""
    from ..distances import as_distance
    from ..reducers import as_reducer
    from ..spec import LossInputs, get_spec

    try:
        chosen = backend_mod.resolve(loss.backend, loss.loss_name, emb.device, emb.dtype)
    except NotImplementedError:
        return None
    if chosen == "reference":
        return None
    from ..driver import needs_reference
    if needs_reference(loss.loss_name, loss.loss_params(), loss.reducer, loss.backend):
        return None  # learned hyper-parameters, or a reducer of PML's: the reference path
    labels, mem_labels = labels.long(), mem_labels.long()  # as the driver: the ops take int64
    if emb.dtype in (torch.float16, torch.bfloat16):  # as the driver: computed in fp32
        emb, mem_emb = emb.float(), mem_emb.float()
    spec = get_spec(loss.loss_name)
    inp = LossInputs(emb, labels, None, torch.roll(mem_emb, -exclude_start, 0),
                     torch.roll(mem_labels, -exclude_start, 0), True,
                     as_distance(loss.distance, spec.default_distance))
    params = loss.loss_params()
    if not supported(chosen, loss.loss_name, params, inp, None):
        return None
    from ..driver import op_scope
    with op_scope(emb):
        return IMPLS[(chosen, loss.loss_name)][1](params, inp,
                                                  as_reducer(loss.reducer, spec.default_reducer))


from . import multi_similarity  # noqa: E402,F401  (registers)
from . import contrastive  # noqa: E402,F401  (registers)
from . import triplet_margin  # noqa: E402,F401  (registers)
from . import hphn_triplet  # noqa: E402,F401  (registers)
from . import proxy_anchor  # noqa: E402,F401  (registers)
from . import proxy_nca  # noqa: E402,F401  (registers)
from . import generalized_lifted  # noqa: E402,F401  (registers)
from . import lifted_structure  # noqa: E402,F401  (registers)
from . import npairs  # noqa: E402,F401  (registers)
from . import ntxent  # noqa: E402,F401  (registers)
from . import circle  # noqa: E402,F401  (registers)
from . import ee_losses  # noqa: E402,F401  (registers)
from . import proxy_metrix  # noqa: E402,F401  (registers)
from . import indices  # noqa: E402,F401  (registers the indices_tuple ops)
from . import cuda_pairs  # noqa: E402,F401  (registers backend="cuda")
from . import cuda_metrix  # noqa: E402,F401  (registers backend="cuda"'s Metrix MS, ...)
from . import cuda_metrix_refs  # noqa: E402,F401  (the CUDA refs ops' autograd)
from . import cuda_proxy_metrix  # noqa: E402,F401  (backend="cuda"'s proxy Metrix)
from . import cuda_ee_hphn  # noqa: E402,F401  (backend="cuda"'s EE for HPHNTripletLoss)
from . import cuda_ee_losses  # noqa: E402,F401  (backend="cuda"'s EE for MS, lifted, ...)
from .. import triton as _triton_engine  # noqa: E402,F401  (registers backend="triton")
