"""Class-balanced batches (P classes × K samples), the sampler DML losses need: a random
batch of a dataset with many classes would hold almost no positive pairs."""
from __future__ import annotations

from typing import Iterator, List

import torch


class ClassBalancedBatches:
    """Yields index batches of `classes_per_batch` distinct classes × `samples_per_class`
    samples each, the samples of a class contiguous (so EE's `pairs="adjacent"` pairs rows
    2t and 2t+1 of one class when `samples_per_class` is even).

    Each class's indices are read from its own reshuffled stream, so every example is seen
    about once per epoch; a class with fewer than `samples_per_class` examples repeats some.
    An epoch has len(labels) // batch_size batches. Deterministic given `seed` and the
    epoch number (set with `set_epoch`).

    With `world_size` W > 1 (one process per rank, e.g. under torchrun) every rank draws the
    same stream and yields its shard: batches rank, rank + W, ..., the same number on each
    rank (the epoch's batches rounded down to a multiple of W, at least W); W = 1 is the
    single-process sampler."""

    def __init__(self, labels: torch.Tensor, classes_per_batch: int, samples_per_class: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        if not torch.is_tensor(labels) or labels.ndim != 1:
            raise ValueError("labels must be a 1-D tensor")
        classes = torch.unique(labels)
        if classes_per_batch < 1 or samples_per_class < 1:
            raise ValueError(f"classes_per_batch and samples_per_class must be >= 1, got "
                             f"{classes_per_batch} and {samples_per_class}")
        if classes_per_batch > len(classes):
            raise ValueError(f"classes_per_batch={classes_per_batch} but the training split "
                             f"has only {len(classes)} classes")
        self.by_class: List[torch.Tensor] = [torch.where(labels == c)[0] for c in classes]
        self.classes_per_batch = classes_per_batch
        self.samples_per_class = samples_per_class
        self.batch_size = classes_per_batch * samples_per_class
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.rank, self.world_size = rank, world_size
        per_rank = max(1, len(labels) // self.batch_size // world_size)
        self.num_batches = per_rank * world_size  # of the shared stream
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches // self.world_size

    def __iter__(self) -> Iterator[List[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        streams = [idx[torch.randperm(len(idx), generator=g)] for idx in self.by_class]
        cursor = [0] * len(streams)
        m = self.samples_per_class
        for step in range(self.num_batches):
            batch: List[int] = []
            for c in torch.randperm(len(streams), generator=g)[:self.classes_per_batch].tolist():
                s = streams[c]
                if cursor[c] + m > len(s):  # stream used up: a fresh shuffle of the class
                    s = streams[c] = torch.cat([s[cursor[c]:], s[torch.randperm(len(s), generator=g)]])
                    cursor[c] = 0
                    while len(s) < m:  # a class smaller than m repeats examples
                        s = streams[c] = torch.cat([s, s[torch.randperm(len(s), generator=g)]])
                batch.extend(s[cursor[c]:cursor[c] + m].tolist())
                cursor[c] += m
            if step % self.world_size == self.rank:
                yield batch
