"""CrossBatchMemory (Wang et al., XBM, CVPR 2020) with PML's API and numbers: a FIFO bank of
the last `memory_size` (detached) embeddings and labels; each call enqueues the batch (or
the rows of `enqueue_mask`) and computes the wrapped loss of the batch against the bank.

The batch's own entries in the bank are not its positives (PML's remove_self_comparisons).
With an embedding-level Metrix on the wrapped loss (PML has none), the mixed term is that of
the batch against the bank under the same rule: mixes of bank entries, each anchor's own
slot neither its positive nor mixed (`_mixed`).
Where a fused op covers the loss (`fused.run_with_memory`: each anchor excludes one bank
slot, (start + row) mod len(bank)), the bank goes through the streaming op and no B×M pair
list exists: a bank of tens of thousands costs O(M·D). Otherwise the pairs are listed as PML lists them
and the loss runs on them: exact, and O(B·M) memory, as in PML.
"""
from __future__ import annotations

import torch

from .. import backend as backend_mod
from .. import fused
from ..distances import as_distance, record_norms, unit_l2_form, wants_norms
from ..driver import (calls_distance, check_addable, draw_lam, needs_reference, op_scope,
                      run_loss)
from ..regularizers import module_options, regularization
from ..records import Records
from ..fused import metrix_refs
from ..reference.metrix import metrix_loss
from ..reference.pairs import all_pairs, to_pairs, to_triplets
from ..spec import LossInputs, get_spec
from ..validation import DataChecks, check_embeddings, check_labels, pml_labels
from .base import BaseMetricLoss, overrides_compute_loss

__all__ = ["CrossBatchMemory"]

# PML's CrossBatchMemory.supported_losses() that metrix_ops has
SUPPORTED = ("CircleLoss", "ContrastiveLoss", "GeneralizedLiftedStructureLoss",
             "LiftedStructureLoss", "MultiSimilarityLoss", "NTXentLoss", "SupConLoss",
             "TripletMarginLoss")

# Metrix pairs a bank takes: neg_neg would mix every pair of the bank's negatives, B·M²
# candidates a step against a bank of M (the chunks run it, but not at bank sizes)
BANK_PAIRS = tuple(p for p in metrix_refs.PAIRS if p != "neg_neg")


def check_metrix_against_refs(loss, who: str, what: str) -> None:
    """A wrapper that runs the loss's Metrix term against references (`what`) takes it at
    the embedding level, pairs in BANK_PAIRS, on a loss with a soft form and a normalising
    distance; else a ValueError naming `who`."""
    mx, name = loss.metrix, loss.loss_name
    normalized = as_distance(loss.distance, get_spec(name).default_distance).normalize_embeddings
    if mx is not None and not (mx.level == "embedding" and mx.pairs in BANK_PAIRS
                               and name in metrix_refs.SOFT_PARTS and normalized):
        raise ValueError(
            f"{who} takes Metrix at the embedding level (mixes of {what} in closed form), "
            f"pairs in {list(BANK_PAIRS)}, on {sorted(metrix_refs.SOFT_PARTS)} with a "
            f"normalising distance; got {mx!r} on {name}")


def mixed_against_refs(loss, emb, labels, refs, ref_labels, own: bool, lam: float):
    """The Metrix term L̃ (unweighted) of `loss` for the anchors emb against references
    (DESIGN §3 with refs as the candidates' set: mixes of references); with `own`, row i's
    own entry is column i of refs and is neither its positive nor mixed. From the CPU
    engine's refs ops on CPU tensors, the CUDA engine's beside its clean term, else the
    anchor chunks (fused/metrix_refs.py): no B × M × M tensor; backend="reference": the
    reference's, which builds it."""
    if emb.dtype in (torch.float16, torch.bfloat16):
        emb, refs = emb.float(), refs.float()
    spec = get_spec(loss.loss_name)
    inp = LossInputs(emb, labels.long(), None, refs, ref_labels.long(), own,
                     as_distance(loss.distance, spec.default_distance))
    args = (loss.loss_name, loss.loss_params(), inp, loss.metrix, lam)
    # (a learned hyper-parameter: the ops would take it as a constant)
    if loss.backend == "reference" or needs_reference(loss.loss_name, loss.loss_params(),
                                                      loss.reducer, loss.backend):
        return metrix_loss(*args)
    try:  # the engine that takes the clean term (as fused.run_with_memory resolves it)
        engine = backend_mod.resolve(loss.backend, loss.loss_name, emb.device, emb.dtype)
    except NotImplementedError:
        engine = None
    with op_scope(emb):
        return metrix_refs.mixed_term(*args, engine=engine)


class CrossBatchMemory(Records, torch.nn.Module):
    def __init__(self, loss, embedding_size: int, memory_size: int = 1024, miner=None):
        super().__init__()
        name = getattr(loss, "loss_name", type(loss).__name__)
        if not isinstance(loss, BaseMetricLoss) or name not in SUPPORTED:
            raise ValueError(f"CrossBatchMemory wraps a metrix_ops loss among {list(SUPPORTED)}, "
                             f"got {type(loss).__name__}")
        for arg, v in (("embedding_size", embedding_size), ("memory_size", memory_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{arg} must be an integer >= 1, got {v!r}")
        if loss.expansion is not None:
            raise ValueError("CrossBatchMemory: the wrapped loss must not use expansion= "
                             "(Embedding Expansion mines the batch's own positive pairs)")
        check_metrix_against_refs(loss, "CrossBatchMemory", "bank entries")
        if getattr(loss, "miner", None) is not None:
            raise ValueError("CrossBatchMemory: give the miner to CrossBatchMemory(miner=...), "
                             "not to the wrapped loss (it mines the batch against the bank)")
        self.loss = loss
        self.miner = miner
        self.embedding_size = embedding_size
        self.memory_size = memory_size
        self.reset_queue()
        self.add_to_recordable_attributes(
            list_of_names=["embedding_size", "memory_size", "queue_idx"])

    @staticmethod
    def supported_losses():
        """The wrapped losses this bank takes (PML's list, less the losses metrix_ops does not
        have)."""
        return list(SUPPORTED)

    @classmethod
    def check_loss_support(cls, loss_name):
        if loss_name not in cls.supported_losses():
            raise ValueError(f"CrossBatchMemory does not support {loss_name}; it wraps one of "
                             f"{cls.supported_losses()}")

    def reset_queue(self) -> None:
        self.register_buffer("embedding_memory", torch.zeros(self.memory_size, self.embedding_size))
        self.register_buffer("label_memory", torch.zeros(self.memory_size, dtype=torch.long))
        self.has_been_filled = False
        self.queue_idx = 0

    def forward(self, embeddings, labels, indices_tuple=None, enqueue_mask=None, *, lam=None):
        # the fused ops' L2 of unit rows is wrong for a (nearly) zero row (driver.loss_terms):
        # the batch's and the bank's rows are looked for in the NaN check's read (the bank
        # before this batch's rows enter it holds every row the loss will see besides them)
        checks = DataChecks()
        l2 = unit_l2_form(as_distance(self.loss.distance,
                                      get_spec(self.loss.loss_name).default_distance))
        check_embeddings(embeddings, allow_empty=True, checks=checks, zero_rows=l2)
        bank = self._bank()[0]
        if l2 and len(bank):
            checks.short_rows(bank, "the memory bank")
        short_rows = checks.read()
        labels = pml_labels(labels, embeddings)  # as PML's
        check_labels(labels, len(embeddings), embeddings.device)
        if embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"embeddings must have embedding_size={self.embedding_size} "
                             f"columns, got shape {tuple(embeddings.shape)}")
        if indices_tuple is not None and enqueue_mask is not None:
            raise ValueError("indices_tuple and enqueue_mask are mutually exclusive")
        if enqueue_mask is not None:
            if (not torch.is_tensor(enqueue_mask) or enqueue_mask.dtype != torch.bool
                    or enqueue_mask.shape != (len(embeddings),)):
                raise ValueError(f"enqueue_mask must be a bool tensor of shape ({len(embeddings)},)")
        elif len(embeddings) > self.memory_size:
            raise ValueError(f"a batch of {len(embeddings)} does not fit memory_size="
                             f"{self.memory_size}")
        dev = embeddings.device
        self.embedding_memory = self.embedding_memory.to(device=dev, dtype=embeddings.dtype)
        self.label_memory = self.label_memory.to(device=dev, dtype=labels.dtype)
        if enqueue_mask is not None:
            enqueue_mask = enqueue_mask.to(dev)
            queue_emb, queue_labels = embeddings[enqueue_mask], labels[enqueue_mask]
            embeddings, labels = embeddings[~enqueue_mask], labels[~enqueue_mask]
        else:
            queue_emb, queue_labels = embeddings, labels
        start = self._enqueue(queue_emb, queue_labels)
        mem_emb, mem_labels = self._bank()
        exclude_start = start if enqueue_mask is None else None

        if overrides_compute_loss(self.loss):
            # a subclass's own compute_loss: PML's call of the wrapped loss on the pairs
            # (its loss dict, its regularizers; Metrix and EE it refuses)
            pairs = self._indices(embeddings, labels, mem_emb, mem_labels, indices_tuple,
                                  exclude_start)
            return self.loss(embeddings, labels, pairs, mem_emb, mem_labels)
        loss = pairs = None
        if (indices_tuple is None and self.miner is None and exclude_start is not None
                and not short_rows):
            loss = fused.run_with_memory(self.loss, embeddings, labels, mem_emb, mem_labels,
                                         exclude_start)
        if loss is None:
            pairs = self._indices(embeddings, labels, mem_emb, mem_labels, indices_tuple,
                                  exclude_start)
            loss = self._clean(embeddings, labels, pairs, mem_emb, mem_labels)
        mx = self.loss.metrix
        if mx is not None and mx.weight > 0:
            check_addable(loss, self.loss.reducer)
            loss = loss + mx.weight * self._mixed(embeddings, labels, mem_emb, mem_labels,
                                                  exclude_start, draw_lam(mx, lam))
        if wants_norms(self.loss.distance):  # the distance call of PML's wrapped loss
            self._record_norms(embeddings, labels, mem_emb, mem_labels, pairs, exclude_start)
        # PML calls the wrapped loss on the batch's (non-enqueued) rows: its embedding
        # regularizer sees those rows, never the bank
        return regularization(loss, embeddings, **module_options(self.loss))

    def _record_norms(self, emb, labels, mem_emb, mem_labels, pairs, exclude_start):
        """The wrapped loss's distance statistics of (the batch, the bank), where PML's loss
        makes that call (driver.calls_distance): over the pairs listed, or (the fused path)
        all pairs but each row's own bank slot, the rolled bank's column i."""
        d = self.loss.distance
        if pairs is not None:
            inp = LossInputs(emb, labels.long(), pairs, mem_emb, mem_labels.long(), False, d)
        else:
            rolled = (torch.roll(t, -exclude_start, 0) for t in (mem_emb, mem_labels.long()))
            inp = LossInputs(emb, labels.long(), None, *rolled, True, d)
        record_norms(d, emb, mem_emb, when=calls_distance(self.loss.loss_name, inp))

    def _clean(self, *args):
        """The wrapped loss without its Metrix term (that term is _mixed's)."""
        loss = self.loss
        return run_loss(loss.loss_name, loss.loss_params(), *args, distance=loss.distance,
                        reducer=loss.reducer, backend=loss.backend)

    def _mixed(self, emb, labels, mem_emb, mem_labels, exclude_start, lam: float):
        """The Metrix term L̃ of the batch against the bank: mixes of bank entries, each
        anchor's own slot neither a positive nor mixed, as the clean loss's pairs."""
        own = exclude_start is not None  # the bank rolled so that row i's slot is column i
        if own:
            mem_emb, mem_labels = (torch.roll(t, -exclude_start, 0) for t in (mem_emb, mem_labels))
        return mixed_against_refs(self.loss, emb, labels, mem_emb, mem_labels, own, lam)

    def _enqueue(self, emb, labels) -> int:
        """Writes the rows at queue_idx, queue_idx+1, ... (mod memory_size); returns the start."""
        start, n = self.queue_idx, len(emb)
        idx = torch.arange(start, start + n, device=emb.device) % self.memory_size
        self.curr_batch_idx = idx  # PML's: the bank slots of the last enqueued rows
        self.embedding_memory[idx] = emb.detach()
        self.label_memory[idx] = labels.detach()
        self.queue_idx = (start + n) % self.memory_size
        if n and self.queue_idx <= start:
            self.has_been_filled = True
        return start

    def _bank(self):
        if self.has_been_filled:
            return self.embedding_memory, self.label_memory
        return self.embedding_memory[: self.queue_idx], self.label_memory[: self.queue_idx]

    def _indices(self, emb, labels, mem_emb, mem_labels, given, exclude_start):
        """PML's create_indices_tuple: the miner's tuple (or all pairs), without each anchor's
        own bank slot, then concatenated with the caller's tuple (converted to its form)."""
        if self.miner is not None:
            tup = tuple(self.miner(emb, labels, mem_emb, mem_labels))
        else:
            tup = all_pairs(labels, mem_labels, same_set=False)
        if exclude_start is not None:
            own = (torch.arange(len(emb), device=emb.device) + exclude_start) % self.memory_size
            a, p = tup[0], tup[1]
            keep = own[a] != p
            tup = (a[keep], p[keep]) + tuple(tup[2:]) if len(tup) == 4 else \
                (a[keep], p[keep], tup[2][keep])
        if given is not None:
            given = tuple(given)
            if len(given) == 3 and len(tup) == 4:
                given = to_pairs(given, labels, mem_labels, False)
            elif len(given) == 4 and len(tup) == 3:
                given = to_triplets(given, labels, mem_labels, False)
            tup = tuple(torch.cat([t, g.to(t.device)]) for t, g in zip(tup, given))
        return tup
