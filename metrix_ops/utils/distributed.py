"""Multi-process training (torch.distributed, e.g. DDP) with the API and numbers of PML's
wrappers (pytorch_metric_learning.utils.distributed), for metrix_ops losses and miners, which
PML's wrappers refuse (they take only PML's own classes).

Each rank gathers every rank's embeddings and labels: its own rows first, keeping their
graph, then the other ranks' in rank order, as constants (PML's order).

- DistributedLossWrapper(loss, efficient=False): every rank computes the loss of the whole
  gathered batch, times the world size, so that DDP's average of the ranks' gradients is the
  whole batch's gradient.
- efficient=True: each rank computes only its own anchors against the gathered set, row i's
  own entry (column i) not a positive (PML's remove_self_comparisons). PML lists all
  B × world·B pairs for it; where a fused op covers the loss (fused.run_with_memory,
  CrossBatchMemory's path) no pair list exists and the gathered set streams through the op:
  O(world·B·D). An embedding-level Metrix term runs against the gathered set under the same
  rule, as CrossBatchMemory's against its bank (PML has no Metrix). With ref_emb the
  gathered references are the set, and PML's rule still drops the positive (i, column i);
  that case runs over PML's pair list.
- Ranks may hold different numbers of rows (the last batch of an epoch): they are gathered
  padded to the largest (PML's all_gather needs equal sizes).
- An embedding-level Metrix λ not given is drawn on rank 0 and broadcast, so every rank
  mixes with the λ one process would use.
- Not in a process group (or world size 1) the wrappers call the loss or miner as is (PML
  warns in the first case; so do these).
- Where PML differs, on purpose: a rank of one row in efficient mode. PML's
  remove_self_comparisons reads a one-row batch as a wrapped-around range and keeps the pair
  (i, column i), the row with itself, as a positive; here it is dropped as for any other
  size (CrossBatchMemory with a batch of one differs from PML's the same way). With unequal
  sizes, efficient mode averages each rank's own anchors (each rank's loss times the world
  size), so a short rank's anchors weigh more than in the whole batch's loss; efficient=False
  is the whole batch's loss exactly.
- Metrix at the feature or input level is not taken (its mixed batch is built per rank, and
  the wrappers do not gather it)."""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from .. import fused
from ..driver import calls_distance, check_addable, draw_lam, run_loss
from ..regularizers import module_options, regularization
from ..distances import record_norms, wants_norms
from ..losses.base import BaseMetricLoss, overrides_compute_loss
from ..losses.cross_batch_memory import (CrossBatchMemory, check_metrix_against_refs,
                                         mixed_against_refs)
from ..reference.pairs import all_pairs
from ..spec import LossInputs, get_spec

__all__ = ["DistributedLossWrapper", "DistributedMinerWrapper", "gather", "is_distributed"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def gather(*xs):
    """Each x (the local rows, any trailing shape; all with the same number of local rows;
    None passes through) with every other rank's rows below it, in rank order: the local
    rows keep their graph, the others are constants. Sizes may differ between ranks: they
    are gathered once, then each tensor padded to the largest."""
    world, rank = dist.get_world_size(), dist.get_rank()
    first = next(x for x in xs if x is not None)
    n = torch.tensor([first.shape[0]], dtype=torch.long, device=first.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    top = max(sizes)

    def one(x):
        if x is None:
            return None
        if x.dtype == torch.bool:  # (not every backend moves bool tensors)
            return one(x.to(torch.uint8)).bool()
        pad = x.new_zeros((top - x.shape[0],) + tuple(x.shape[1:]))
        parts = [x.new_empty((top,) + tuple(x.shape[1:])) for _ in range(world)]
        dist.all_gather(parts, torch.cat([x.detach(), pad]).contiguous())
        return torch.cat([x] + [parts[r][:sizes[r]] for r in range(world) if r != rank])
    out = tuple(one(x) for x in xs)
    return out[0] if len(xs) == 1 else out


def _shared_lam(loss, lam, device):
    """The λ of an embedding-level Metrix term (of the loss, or of the loss a CrossBatchMemory
    wraps): the caller's, else drawn on rank 0 and sent to every rank (the caller's lam when
    there is no such term)."""
    mx = _inner(loss).metrix
    if mx is None or mx.level != "embedding" or mx.weight == 0:
        return lam
    t = torch.tensor([draw_lam(mx, lam)], dtype=torch.float64, device=device)
    dist.broadcast(t, 0)
    return float(t)


def _inner(loss):
    return loss.loss if isinstance(loss, CrossBatchMemory) else loss


class DistributedLossWrapper(torch.nn.Module):
    """PML's DistributedLossWrapper for a metrix_ops loss or CrossBatchMemory."""

    def __init__(self, loss, efficient: bool = False):
        super().__init__()
        if not isinstance(loss, (BaseMetricLoss, CrossBatchMemory)):
            raise TypeError("DistributedLossWrapper wraps a metrix_ops loss or CrossBatchMemory, "
                            f"got {type(loss).__name__} (for a PML loss use PML's wrapper)")
        if isinstance(loss, CrossBatchMemory) and efficient:
            raise ValueError("CrossBatchMemory with efficient=True is not supported (as in PML)")
        mx = _inner(loss).metrix
        if mx is not None and mx.level != "embedding":
            raise ValueError(f"DistributedLossWrapper takes Metrix at the embedding level; "
                             f"got level={mx.level!r} (a feature- or input-level mixed batch is "
                             "built per rank, and the wrapper does not gather it)")
        if efficient:
            spec = get_spec(loss.loss_name)
            if not (spec.supports_ref_emb and spec.supports_indices_tuple):
                raise ValueError(f"efficient=True runs each rank's rows against the gathered "
                                 f"rows (ref_emb, or PML's pair list), which {loss.loss_name} "
                                 "does not take; use efficient=False")
            if loss.expansion is not None:
                raise ValueError("efficient=True: the loss must not use expansion= (Embedding "
                                 "Expansion mines the batch's own positive pairs); use "
                                 "efficient=False")
            if loss.miner is not None:
                raise ValueError("efficient=True: give the miner as DistributedMinerWrapper("
                                 "miner, efficient=True) and its tuple to the call, not as the "
                                 "loss's miner=")
            check_metrix_against_refs(loss, "DistributedLossWrapper(efficient=True)",
                                      "the gathered embeddings")
        self.loss = loss
        self.efficient = efficient

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None,
                ref_labels=None, enqueue_mask=None, *, lam=None):
        if isinstance(self.loss, CrossBatchMemory) and (ref_emb is not None
                                                        or ref_labels is not None):
            raise ValueError("CrossBatchMemory is not compatible with ref_emb and ref_labels")
        # every tensor gathered from the embeddings' device (NCCL moves CUDA tensors only)
        dev = embeddings.device
        labels, ref_labels, enqueue_mask = (None if t is None else t.to(dev)
                                            for t in (labels, ref_labels, enqueue_mask))
        if not is_distributed():
            warnings.warn("DistributedLossWrapper is being used in a non-distributed setting. "
                          "Returning the loss as is.")
            return self._local(embeddings, labels, indices_tuple, ref_emb, ref_labels,
                               enqueue_mask, lam)
        world = dist.get_world_size()
        lam = _shared_lam(self.loss, lam, embeddings.device)
        if world <= 1:
            return self._local(embeddings, labels, indices_tuple, ref_emb, ref_labels,
                               enqueue_mask, lam)
        if isinstance(self.loss, CrossBatchMemory):
            all_emb, all_labels, mask = gather(embeddings, labels, enqueue_mask)
            return self.loss(all_emb, all_labels, indices_tuple, mask,
                             lam=lam) * world
        if enqueue_mask is not None:
            raise ValueError("enqueue_mask is for a wrapped CrossBatchMemory")
        all_emb, all_labels = gather(embeddings, labels)
        all_ref, all_ref_labels = (None, None) if ref_emb is None else gather(ref_emb, ref_labels)
        if not self.efficient:
            return self.loss(all_emb, all_labels, indices_tuple, all_ref, all_ref_labels,
                             lam=lam) * world
        if all_ref is None:
            return self._against(embeddings, labels, indices_tuple, all_emb, all_labels, True,
                                 lam) * world
        if all_ref_labels is None and (indices_tuple is None or self.loss.metrix is not None):
            raise ValueError("efficient=True with ref_emb needs ref_labels (the pairs, or the "
                             "Metrix term, are built from them)")
        return self._against(embeddings, labels, indices_tuple, all_ref, all_ref_labels, False,
                             lam) * world

    def _local(self, emb, labels, indices_tuple, ref_emb, ref_labels, enqueue_mask, lam):
        if isinstance(self.loss, CrossBatchMemory):
            return self.loss(emb, labels, indices_tuple, enqueue_mask, lam=lam)
        return self.loss(emb, labels, indices_tuple, ref_emb, ref_labels, lam=lam)

    def _against(self, emb, labels, indices_tuple, refs, ref_labels, own: bool, lam):
        """The local anchors against the gathered set without PML's self comparisons (the
        positive pairs (i, column i)). Where the set is the gathered batch (`own`), column i
        is row i itself, so a fused op that skips it streams the clean term
        (fused.run_with_memory) and the Metrix term leaves it out too; against gathered
        references (PML's quirk: column i is then some other row, a negative where the labels
        differ) the clean term runs over PML's pair list and the Metrix term takes every
        reference."""
        loss = self.loss
        if labels is None and (indices_tuple is None or loss.metrix is not None):
            raise ValueError("efficient=True needs labels (the pairs, or the Metrix term, are "
                             "built from them), or an indices_tuple")
        clean = streamed = None
        if indices_tuple is None:
            if own and not overrides_compute_loss(loss):
                clean = streamed = fused.run_with_memory(loss, emb, labels, refs, ref_labels, 0)
            if clean is None:  # PML's get_indices_tuple: all pairs but the positive (i, i)
                indices_tuple = all_pairs(labels.long(), ref_labels.long(), same_set=True)
        if overrides_compute_loss(loss):  # a subclass's own compute_loss: PML's call of it
            return loss(emb, labels, indices_tuple, refs, ref_labels)
        if clean is None:
            clean = run_loss(loss.loss_name, loss.loss_params(), emb, labels, indices_tuple,
                             refs, ref_labels, distance=loss.distance, reducer=loss.reducer,
                             backend=loss.backend)
        mx = loss.metrix
        if mx is not None and mx.weight > 0 and mx.level == "embedding":
            check_addable(clean, loss.reducer)
            clean = clean + mx.weight * mixed_against_refs(loss, emb, labels, refs, ref_labels,
                                                           own, draw_lam(mx, lam))
        if streamed is not None and wants_norms(loss.distance):
            # the distance PML's loss calls (the fused op does not): all pairs but (i, i)
            inp = LossInputs(emb, labels.long(), None, refs, ref_labels.long(), True,
                             loss.distance)
            record_norms(loss.distance, emb, refs, when=calls_distance(loss.loss_name, inp))
        # PML's efficient mode calls the loss on the local rows: its embedding regularizer
        # sees this rank's embeddings
        return regularization(clean, emb, **module_options(loss))


class DistributedMinerWrapper(torch.nn.Module):
    """PML's DistributedMinerWrapper: the wrapped miner's tuple over the gathered batch
    (efficient=False: indices into the gathered batch, for a DistributedLossWrapper with
    efficient=False), or of the local rows against it without (i, column i) (efficient=True:
    for one with efficient=True)."""

    def __init__(self, miner, efficient: bool = False):
        super().__init__()
        if not callable(miner):
            raise TypeError(f"miner must be a miner module, got {type(miner).__name__}")
        self.miner = miner
        self.efficient = efficient

    def forward(self, embeddings, labels, ref_emb=None, ref_labels=None):
        dev = embeddings.device  # gathered from the embeddings' device, as the loss wrapper
        labels, ref_labels = (None if t is None else t.to(dev) for t in (labels, ref_labels))
        if not is_distributed() or dist.get_world_size() <= 1:
            return self.miner(embeddings, labels, ref_emb, ref_labels)
        all_emb, all_labels = gather(embeddings, labels)
        all_ref, all_ref_labels = (None, None) if ref_emb is None else gather(ref_emb, ref_labels)
        if not self.efficient:
            return self.miner(all_emb, all_labels, all_ref, all_ref_labels)
        refs = all_emb if all_ref is None else all_ref
        ref_lab = all_labels if all_ref_labels is None else all_ref_labels
        tup = tuple(self.miner(embeddings, labels, refs, ref_lab))
        # PML's remove_self_comparisons: the positive (or anchor–positive) pairs (i, i)
        keep = tup[0] != tup[1]
        if len(tup) == 4:
            return tup[0][keep], tup[1][keep], tup[2], tup[3]
        return tuple(t[keep] for t in tup)
