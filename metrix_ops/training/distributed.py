"""The reference training run over several processes (DDP), as `torchrun` starts them:

    torchrun --nproc_per_node=8 -m metrix_ops.train --device cuda --data ROOT ...

Each rank draws its own P×K batch (ClassBalancedBatches' rank shard of one shared stream, so
one step of W ranks sees the W consecutive batches one process would see in W steps) and
its model is wrapped in DistributedDataParallel, which averages the ranks' gradients.

- The clean loss, embedding-level Metrix and EE go through DistributedLossWrapper
  (utils/distributed.py): every rank computes the loss of the gathered batch of all ranks'
  embeddings, times the world size, so the averaged gradient is the gathered batch's (its
  Metrix λ drawn once, on rank 0). With --ddp-efficient, each rank's own anchors against the
  gathered batch (PML's efficient mode: the objective is the sum of the ranks' losses). A proxy loss's proxies are the same on every rank and
  get the same (world-size times too large) gradient there: it is divided back (all-reduced,
  so the ranks cannot drift apart).
- Metrix at the feature or input level mixes inside each rank's network, so its mixed batch
  is per rank: each rank's loss is over its own batch (no gathering), and the gradients
  are averaged after the backward (two forward passes per step, which DDP does not take).
- Evaluation runs on rank 0 alone (the others wait); only rank 0 prints and writes.

Not under torchrun (WORLD_SIZE unset or 1) nothing here changes the single-process run."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..versions import TORCH_VERSION


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device: torch.device) -> Ranks:
    """This process's rank and device: from torchrun's environment (WORLD_SIZE, RANK,
    LOCAL_RANK), joining the process group (NCCL on CUDA devices, gloo on the CPU) if it is
    not joined yet; a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks(0, 1, device)
    if device.type == "cuda":  # one GPU per rank: the local rank's
        if device.index not in (None, 0):
            raise ValueError(f"--device {device}: under torchrun each rank takes the GPU of "
                             "its LOCAL_RANK; pass --device cuda")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # rank 0's evaluation of a large --data set may outlast the 10-minute default while
        # the other ranks wait in a barrier
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=60))
    return Ranks(dist.get_rank(), dist.get_world_size(), device)


def _per_rank(metrix_level) -> bool:
    """Feature/input-level Metrix: two forward passes per step (clean, then mixed), which
    DistributedDataParallel's one-forward-per-backward bookkeeping does not take; so the
    model is not wrapped and each rank's gradients are averaged after the backward."""
    return metrix_level in ("feature", "input")


def wrap_model(model: torch.nn.Module, metrix_level, ranks: Ranks) -> torch.nn.Module:
    """DistributedDataParallel, or in the per-rank mode the model itself with rank 0's
    parameters and buffers broadcast once (as DDP does when it wraps a model; sync_grads
    then sends rank 0's buffers after every step)."""
    if ranks.world <= 1:
        return model
    if _per_rank(metrix_level):
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, 0)
        return model
    ids = [ranks.device.index] if ranks.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def wrap_loss(loss_fn, metrix_level, ranks: Ranks, efficient: bool = False):
    """The loss every rank calls: the gathered batch's (DistributedLossWrapper; with
    `efficient`, the rank's own anchors against the gathered batch), or, for feature/input-level
    Metrix, the rank's own."""
    if ranks.world <= 1 or _per_rank(metrix_level):
        return loss_fn
    from ..utils.distributed import DistributedLossWrapper
    return DistributedLossWrapper(loss_fn, efficient=efficient)


def _all_reduce_grads(params, scale: float) -> None:
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= scale


def sync_grads(model, loss_fn, metrix_level, ranks: Ranks, efficient: bool = False) -> None:
    """After the backward, what DDP does not average. The gathered loss is the world size
    times the whole batch's on every rank, so the loss's own parameters (proxies) get world ×
    their gradient, the same on each rank: summed over the ranks and divided by world², it is
    the whole batch's. With `efficient` each rank's loss L_r is its own (times the world
    size), and DDP's average makes the model's gradient that of Σ_r L_r: the proxies' sum over
    the ranks is divided by the world size to match. With a rank's own loss (feature/input-
    level Metrix) the model's and the loss's gradients are averaged, and rank 0's buffers
    (BatchNorm's running statistics) sent to the others, as DDP sends them at each forward."""
    if ranks.world <= 1:
        return
    if _per_rank(metrix_level):
        _all_reduce_grads(list(model.parameters()) + list(loss_fn.parameters()), ranks.world)
        for t in model.buffers():
            dist.broadcast(t.data, 0)
    else:
        _all_reduce_grads(loss_fn.parameters(), ranks.world if efficient else ranks.world ** 2)


def step_value(loss: torch.Tensor, scale: float, ranks: Ranks):
    """(whether every rank's loss is finite, loss / scale averaged over the ranks) from one
    all-reduce and one host read per step: the ranks stop together on a non-finite loss,
    where a rank raising alone would leave the others waiting in a collective."""
    v = loss.detach().to(torch.float64).reshape(1) / scale
    t = torch.cat([torch.isfinite(v).to(torch.float64), v])
    if ranks.world > 1:
        dist.all_reduce(t)
    ok, total = t.tolist()
    return ok == ranks.world, total / ranks.world


def barrier(ranks: Ranks) -> None:
    if ranks.world > 1:
        dist.barrier()


def teardown() -> None:
    if dist.is_initialized():
        dist.barrier()  # every rank past its last collective
        # torch 2.4's gloo destroy hung now and then with both ranks in it (1 run in 8 of the
        # two-process test; 0 in 10 on torch 2.6): there the group is left to the exit
        if TORCH_VERSION >= (2, 6):
            dist.destroy_process_group()
