"""One training run: class-balanced batches, the loss (with Metrix at the embedding,
feature or input level, or EE), and retrieval evaluation on the unseen test classes."""
from __future__ import annotations

import time
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import metrics
from ..mixup import mix_pairs, mixing_hook
from . import distributed as ddp
from .config import TrainConfig
from .data import Split, digits_split, image_folder_split
from .loss_setup import build_loss
from .models import build_model, save_trained
from .sampler import ClassBalancedBatches


class _Indexed(torch.utils.data.Dataset):
    """Returns (example, index) so a batch knows its labels without a second lookup."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[i][0], i


def load_split(cfg: TrainConfig) -> Split:
    return digits_split() if cfg.data is None else image_folder_split(cfg.data, cfg.image_size)


def _device(name: str) -> torch.device:
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r} is not a device name (cpu, cuda, cuda:1)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available here")
    return dev


def loss_step(model, loss_fn, x, y, cfg: TrainConfig, net=None) -> torch.Tensor:
    """The loss of one batch. Feature level: the mixes of the pairs chosen on the clean
    embeddings replace the mixing point's output in a second pass (the model is not
    changed); input level: the mixed images go through the whole network. `net`: the model
    itself where `model` wraps it (its mixing point)."""
    net = model if net is None else net
    emb = model(x)
    if cfg.metrix in (None, "embedding"):
        return loss_fn(emb, y)
    h = x if cfg.metrix == "input" else None
    mixed = mix_pairs(h, y, pairs=cfg.metrix_pairs, alpha=cfg.metrix_alpha,
                      embeddings=emb.detach())
    if len(mixed) == 0:  # nothing to mix (one class, or no negatives): the clean loss only
        mixed_emb = emb.new_zeros(0, emb.shape[1])
    elif cfg.metrix == "input":
        mixed_emb = model(mixed.inputs)
    else:
        with mixing_hook(net.mix_point, mixed):
            mixed_emb = model(x)
    return loss_fn(emb, y, mixed_embeddings=mixed_emb, mixed=mixed)


@torch.no_grad()
def embed(model, dataset, device, batch_size: int = 256, workers: int = 0) -> torch.Tensor:
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    out = [model(b[0].to(device)).float() for b in loader]
    return F.normalize(torch.cat(out), dim=1) if out else torch.zeros(0)


def evaluate(model, split: Split, device, seed: int = 0, workers: int = 0) -> dict:
    """Zero-shot retrieval on the test classes (each test image queries all the others) and
    the Metrix paper's utilization of the training embeddings for the test queries."""
    test = embed(model, split.test, device, workers=workers)
    train = embed(model, split.train, device, workers=workers)
    res = metrics.get_accuracy(test, split.test_labels.to(device), seed=seed)
    res["utilization"] = float(metrics.utilization(test, train))
    return {k: float(v) for k, v in res.items()}


def train(cfg: TrainConfig, split: Optional[Split] = None, progress: bool = True) -> dict:
    """Trains from scratch with `cfg.seed` and returns {"config", "history" (one dict per
    evaluation, epoch 0 included: epoch, mean training loss (None at 0), metrics), "final",
    "seconds"}. Under torchrun (distributed.py) every rank trains on its shard of the
    batches and rank 0 evaluates: the other ranks return {} ("world_size" says how many)."""
    torch.manual_seed(cfg.seed)
    ranks = ddp.setup(_device(cfg.device))
    device = ranks.device
    split = split if split is not None else load_split(cfg)
    net = build_model(cfg.backbone, split.in_channels, split.image_size, cfg.embedding_dim,
                      cfg.pretrained).to(device)
    loss_fn = build_loss(cfg, split.num_train_classes, cfg.embedding_dim).to(device)
    groups = [{"params": net.parameters(), "lr": cfg.lr}]
    if list(loss_fn.parameters()):
        groups.append({"params": loss_fn.parameters(), "lr": cfg.loss_lr})
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    model = ddp.wrap_model(net, cfg.metrix, ranks)
    step_loss = ddp.wrap_loss(loss_fn, cfg.metrix, ranks, cfg.ddp_efficient)
    sampler = ClassBalancedBatches(split.train_labels, cfg.classes_per_batch,
                                   cfg.samples_per_class, seed=cfg.seed, rank=ranks.rank,
                                   world_size=ranks.world)
    loader = torch.utils.data.DataLoader(_Indexed(split.train), batch_sampler=sampler,
                                         num_workers=cfg.workers)
    start = time.perf_counter()

    def evaluated(row):  # on rank 0; the others wait for it
        if ranks.main:
            row.update(evaluate(net, split, device, cfg.seed, cfg.workers))
        ddp.barrier(ranks)
        return row
    # epoch 0: the untrained network, the point training on the seen classes is judged from
    history = [evaluated({"epoch": 0, "loss": None})]
    bar = tqdm(range(1, cfg.epochs + 1), disable=not (progress and ranks.main),
               desc=cfg.describe(), unit="epoch", leave=False)
    for epoch in bar:
        sampler.set_epoch(epoch)
        model.train()
        total, steps = 0.0, 0
        for x, idx in loader:
            x, y = x.to(device), split.train_labels[idx].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp):
                loss = loss_step(model, step_loss, x, y, cfg, net)
            # a wrapped loss is world × the whole batch's (or, efficient, the rank's own
            # anchors'): logged without that factor, averaged over the ranks
            finite, value = ddp.step_value(loss, 1 if step_loss is loss_fn else ranks.world,
                                           ranks)
            if not finite:
                raise FloatingPointError(f"the loss became {float(loss)} at epoch {epoch} "
                                         "(on this process or another rank); lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            ddp.sync_grads(net, loss_fn, cfg.metrix, ranks, cfg.ddp_efficient)
            opt.step()
            total, steps = total + value, steps + 1
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            row = evaluated({"epoch": epoch, "loss": total / max(steps, 1)})
            history.append(row)
            if ranks.main:
                bar.set_postfix(loss=f"{row['loss']:.4f}", R1=f"{row['precision_at_1']:.3f}")
    if not ranks.main:
        return {"world_size": ranks.world}
    if cfg.save_model:
        save_trained(net, cfg, split.in_channels, split.image_size, cfg.save_model)
    return {"config": cfg.to_dict(), "history": history, "final": history[-1],
            "seconds": time.perf_counter() - start, "world_size": ranks.world}
