"""The work of each rank for test_train_distributed.py (a module the spawned processes
import): one training step of the reference run's distributed pieces
(metrix_ops/training/distributed.py) on a small linear model, and the same step computed in
one process from every rank's batch, both saved for the test process to compare."""
import os

import torch

WORLD = 2
SIZES = (6, 9)  # the ranks' batch sizes (unequal, as the last batch of an epoch may be)

# (key, loss class, constructor kwargs, Metrix level the run would have, --ddp-efficient)
CASES = [("ms", "MultiSimilarityLoss", {}, None, False),
         ("ms-metrix", "MultiSimilarityLoss", {"metrix": "embedding"}, "embedding", False),
         ("proxy-anchor", "ProxyAnchorLoss", {"num_classes": 3, "embedding_size": 4}, None,
          False),
         ("per-rank", "ProxyAnchorLoss", {"num_classes": 3, "embedding_size": 4}, "feature",
          False),
         ("ms-efficient", "MultiSimilarityLoss", {}, None, True),
         ("contrastive-efficient", "ContrastiveLoss", {}, None, True)]


def efficient_oracle(name, kw, net, parts):
    """Σ_r L_r, L_r rank r's own anchors against all ranks' embeddings with its own column
    not a pair (PML's efficient rule: its pair list on the reference backend), the other
    ranks' embeddings constants: the objective DDP's average of the ranks' gradients follows."""
    import metrix_ops as mo
    from metrix_ops.reference.pairs import all_pairs
    loss = getattr(mo.losses, name)(backend="reference", **kw)
    total = 0
    for r, (xr, yr) in enumerate(parts):
        own = net(xr)
        others = [net(x).detach() for q, (x, _) in enumerate(parts) if q != r]
        ys = torch.cat([yr] + [y for q, (_, y) in enumerate(parts) if q != r])
        total = total + loss(own, yr, all_pairs(yr, ys, same_set=True),
                             torch.cat([own] + others), ys)
    return total


def batches():
    g = torch.Generator().manual_seed(11)
    return [(torch.randn(b, 6, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (b,), generator=g)) for b in SIZES]


def build(name, kw):
    import metrix_ops as mo
    kw = dict(kw)
    if kw.pop("metrix", None):
        kw["metrix"] = mo.Metrix(lam=0.35)
    torch.manual_seed(3)  # the same model and proxies on every rank
    net = torch.nn.Linear(6, 4).double()
    loss = getattr(mo.losses, name)(backend="cpu", **kw).double()
    return net, loss


def grads(net, loss):
    return [p.grad.clone() for p in list(net.parameters()) + list(loss.parameters())]


def rank_main(rank, store, out_dir):
    os.environ.update(WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=open(store).read().strip())
    from metrix_ops.training import distributed as ddp
    ranks = ddp.setup(torch.device("cpu"))
    parts = batches()
    x, y = parts[rank]
    out = {"ranks": (ranks.rank, ranks.world)}
    for key, name, kw, level, efficient in CASES:
        net, loss_fn = build(name, kw)
        model = ddp.wrap_model(net, level, ranks)
        step_loss = ddp.wrap_loss(loss_fn, level, ranks, efficient)
        step_loss(model(x), y).backward()
        ddp.sync_grads(net, loss_fn, level, ranks, efficient)
        out[key] = grads(net, loss_fn)
        # one process: the whole batch's loss, or (per rank) the mean of the ranks' losses
        net, loss_fn = build(name, kw)
        if efficient:
            ref = efficient_oracle(name, kw, net, parts)
        elif level in ("feature", "input"):
            ref = sum(loss_fn(net(xr), yr) for xr, yr in parts) / WORLD
        else:
            ref = loss_fn(net(torch.cat([p[0] for p in parts])),
                          torch.cat([p[1] for p in parts]))
        ref.backward()
        out[key + "/oracle"] = grads(net, loss_fn)
    # the ranks stop together: rank 1's NaN loss is every rank's stop
    out["finite"] = (ddp.step_value(torch.tensor(1.0), 1, ranks)[0],
                     ddp.step_value(torch.tensor(float("nan") if rank == 1 else 2.0), 1,
                                    ranks)[0])
    out["mean"] = ddp.step_value(torch.tensor(float(rank + 1)), 2, ranks)[1]
    # the per-rank mode starts every rank from rank 0's parameters and buffers
    torch.manual_seed(100 + rank)
    bn = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    bn[1].running_mean.fill_(rank + 5.0)
    model = ddp.wrap_model(bn, "feature", ranks)
    out["per-rank-state"] = [t.detach().clone() for t in
                             list(model.parameters()) + list(model.buffers())]
    # a step on each rank's own batch moves each rank's running statistics its own way;
    # sync_grads leaves rank 0's on every rank (as DDP's buffer broadcast)
    model(torch.randn(4, 3) + rank).sum().backward()
    ddp.sync_grads(model, torch.nn.Module(), "feature", ranks)
    out["per-rank-buffers"] = [t.clone() for t in model.buffers()]
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    ddp.teardown()
