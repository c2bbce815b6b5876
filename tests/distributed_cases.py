"""The work of each rank for test_distributed.py (a module the spawned processes import): every
rank builds the same global data from one seed, takes its own rows, runs each case through
metrix_ops' wrapper and through the oracle, and saves values and gradients for the test
process to compare.

Oracles: PML's own DistributedLossWrapper / DistributedMinerWrapper around the PML loss or
miner, in the same process group (equal batch sizes: PML's all_gather needs them); for
unequal sizes and for Metrix (PML has none) the whole gathered batch computed in one process
from the global data, on the reference backend."""
import datetime
import os

import torch
import torch.distributed as dist

WORLD = 2
D = 5


def global_batch(sizes, seed, classes=4):
    """Every rank's (x, y), float64, from one seed."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, D, generator=g, dtype=torch.float64),
             torch.randint(0, classes, (b,), generator=g)) for b in sizes]


def value_grad(fn, x):
    x = x.clone().requires_grad_(True)
    v = fn(x)
    v.backward()
    return v.detach(), x.grad


def gathered_order(parts, rank):
    """The gathered batch as a rank sees it: its own rows, then the others in rank order."""
    return [parts[rank]] + [p for r, p in enumerate(parts) if r != rank]


def whole_batch_oracle(loss, parts, rank, efficient, lam):
    """(value, grad of the rank's rows) of the wrapper's definition, in one process."""
    others = [p for r, p in enumerate(parts) if r != rank]
    xs_o = [x for x, _ in others]
    y_all = torch.cat([y for _, y in gathered_order(parts, rank)])
    x_r, y_r = parts[rank]

    def fn(x):
        x_all = torch.cat([x] + xs_o)
        if not efficient:
            return loss(x_all, y_all, lam=lam) * WORLD
        from metrix_ops.losses.cross_batch_memory import mixed_against_refs
        from metrix_ops.reference.pairs import all_pairs
        clean_loss = type(loss)(backend="reference", **_ctor_kwargs(loss))
        tup = all_pairs(y_r, y_all, same_set=True)
        v = clean_loss(x, y_r, tup, x_all, y_all)
        if loss.metrix is not None:
            v = v + loss.metrix.weight * mixed_against_refs(loss, x, y_r, x_all, y_all, True, lam)
        return v * WORLD
    return value_grad(fn, x_r)


def _ctor_kwargs(loss):
    return {k: v for k, v in loss.loss_params().items() if not torch.is_tensor(v)}


def loss_cases():
    """(key, our loss factory, PML loss factory or None, efficient, sizes)."""
    import pytorch_metric_learning.losses as pl
    import pytorch_metric_learning.regularizers as preg

    import metrix_ops as mo
    cases = []
    for eff in (False, True):
        for backend in ("cpu", "reference"):
            cases += [
                (f"ms-{backend}-{eff}", lambda b=backend: mo.losses.MultiSimilarityLoss(backend=b),
                 lambda: pl.MultiSimilarityLoss(), eff, (6, 6)),
                (f"contrastive-{backend}-{eff}",
                 lambda b=backend: mo.losses.ContrastiveLoss(pos_margin=0.1, neg_margin=0.9,
                                                             backend=b),
                 lambda: pl.ContrastiveLoss(pos_margin=0.1, neg_margin=0.9), eff, (7, 7)),
                (f"triplet-{backend}-{eff}",
                 lambda b=backend: mo.losses.TripletMarginLoss(margin=0.2, backend=b),
                 lambda: pl.TripletMarginLoss(margin=0.2), eff, (5, 5)),
            ]
        cases += [
            (f"circle-{eff}", lambda: mo.losses.CircleLoss(backend="cpu"), lambda: pl.CircleLoss(),
             eff, (6, 6)),
            (f"ntxent-{eff}", lambda: mo.losses.NTXentLoss(backend="cpu"),
             lambda: pl.NTXentLoss(), eff, (6, 6)),
            # the embedding regularizer: of the gathered batch, or (efficient) of the local rows
            (f"ms-regularized-{eff}", lambda: mo.losses.MultiSimilarityLoss(
                backend="cpu", embedding_regularizer=mo.regularizers.LpRegularizer(power=2),
                embedding_reg_weight=0.3),
             lambda: pl.MultiSimilarityLoss(embedding_regularizer=preg.LpRegularizer(power=2),
                                            embedding_reg_weight=0.3), eff, (6, 6)),
            (f"ms-unequal-{eff}", lambda: mo.losses.MultiSimilarityLoss(backend="cpu"), None, eff,
             (7, 3)),
            (f"ms-metrix-{eff}", lambda: mo.losses.MultiSimilarityLoss(
                backend="cpu", metrix=mo.Metrix(lam=0.3)), None, eff, (6, 5)),
            (f"contrastive-metrix-{eff}", lambda: mo.losses.ContrastiveLoss(
                backend="cpu", metrix=mo.Metrix(lam=0.6, pairs="anchor_neg")), None, eff, (5, 6)),
        ]
    cases.append(("proxy-anchor-False", lambda: mo.losses.ProxyAnchorLoss(4, D, backend="cpu"),
                  None, False, (6, 4)))
    return cases


def rank_main(rank, store, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    import pytorch_metric_learning.losses as pl
    import pytorch_metric_learning.miners as pm
    from pytorch_metric_learning.utils import distributed as pml_dist

    import metrix_ops as mo
    from metrix_ops.utils.distributed import DistributedLossWrapper, DistributedMinerWrapper
    out = {}
    for i, (key, ours, pml, eff, sizes) in enumerate(loss_cases()):
        parts = global_batch(sizes, seed=i)
        x, y = parts[rank]
        loss = ours()
        if key.startswith("proxy"):  # the proxies, identical on every rank
            torch.manual_seed(7)
            loss = ours()
        wrapped = DistributedLossWrapper(loss, efficient=eff)
        out[key] = value_grad(lambda e: wrapped(e, y), x)
        if pml is not None:
            pwrapped = pml_dist.DistributedLossWrapper(pml(), efficient=eff)
            out[key + "/oracle"] = value_grad(lambda e: pwrapped(e, y), x)
        elif key.startswith("proxy"):
            torch.manual_seed(7)
            ref = ours()
            ref.backend = "reference"
            out[key + "/oracle"] = whole_batch_oracle(ref, parts, rank, eff, None)
        else:
            ref = ours()
            ref.backend = "reference"
            out[key + "/oracle"] = whole_batch_oracle(ref, parts, rank, eff, 0.3 if "ms" in key
                                                      else 0.6)
    # a reference set beside the batch (gathered too; efficient: row i's own entry is
    # column i of the gathered references, as PML's remove_self_comparisons takes it)
    for eff in (False, True):
        for name in ("MultiSimilarityLoss", "ContrastiveLoss"):
            parts = global_batch((6, 6), seed=80)
            refs = global_batch((7, 7), seed=81)
            (x, y), (r, ry) = parts[rank], refs[rank]
            ours = DistributedLossWrapper(getattr(mo.losses, name)(backend="cpu"), efficient=eff)
            pml = pml_dist.DistributedLossWrapper(getattr(pl, name)(), efficient=eff)
            out[f"ref-{name}-{eff}"] = value_grad(lambda e: ours(e, y, None, r, ry), x)
            out[f"ref-{name}-{eff}/oracle"] = value_grad(lambda e: pml(e, y, None, r, ry), x)
    # λ drawn once and broadcast: every rank's whole-batch loss is the same number, though
    # the ranks' generators differ (each would draw its own λ)
    torch.manual_seed(100 + rank)
    parts = global_batch((6, 6), seed=50)
    x, y = parts[rank]
    wrapped = DistributedLossWrapper(mo.losses.MultiSimilarityLoss(backend="cpu",
                                                                   metrix=mo.Metrix()))
    out["drawn-lam"] = value_grad(lambda e: wrapped(e, y), x)
    # ... and for a wrapped CrossBatchMemory's Metrix term
    xbm = DistributedLossWrapper(mo.losses.CrossBatchMemory(
        mo.losses.MultiSimilarityLoss(backend="cpu", metrix=mo.Metrix()), D, memory_size=30))
    out["drawn-lam-xbm"] = value_grad(lambda e: xbm(e, y), x)
    # one row per rank, efficient: the row with itself is not a pair (PML keeps it there: the
    # module docstring), against the whole batch computed in one process
    parts = global_batch((1, 1), seed=55, classes=1)
    x, y = parts[rank]
    ms = mo.losses.MultiSimilarityLoss(backend="cpu")
    one = DistributedLossWrapper(ms, efficient=True)
    out["one-row"] = value_grad(lambda e: one(e, y), x)
    ref = mo.losses.MultiSimilarityLoss(backend="reference")
    out["one-row/oracle"] = whole_batch_oracle(ref, parts, rank, True, None)
    # CrossBatchMemory wrapped: against PML's wrapper around PML's CrossBatchMemory, two calls
    # that fill the bank; without and with an enqueue_mask (gathered too)
    for key, name, masked in (("xbm", "ContrastiveLoss", False),
                              ("xbm-mask", "MultiSimilarityLoss", True)):
        ours_xbm = DistributedLossWrapper(mo.losses.CrossBatchMemory(
            getattr(mo.losses, name)(backend="cpu"), D, memory_size=20))
        pml_xbm = pml_dist.DistributedLossWrapper(pl.CrossBatchMemory(
            getattr(pl, name)(), D, memory_size=20))
        for step in range(2):
            x, y = global_batch((6, 6), seed=60 + step + 5 * masked)[rank]
            mask = (torch.arange(6) % 3 == rank) if masked else None
            out[f"{key}-{step}"] = value_grad(lambda e: ours_xbm(e, y, None, None, None, mask), x)
            out[f"{key}-{step}/oracle"] = value_grad(
                lambda e: pml_xbm(e, y, None, None, None, mask), x)
    # miners: the tuples against PML's wrapper around PML's miner; then a loss on the tuple
    x, y = global_batch((8, 8), seed=70)[rank]
    miners = {"ms": (mo.miners.MultiSimilarityMiner(0.1), pm.MultiSimilarityMiner(0.1)),
              "triplet": (mo.miners.TripletMarginMiner(0.3, type_of_triplets="all"),
                          pm.TripletMarginMiner(0.3, type_of_triplets="all"))}
    for eff in (False, True):
        for kind, (m_ours, m_pml) in miners.items():
            ours_m = DistributedMinerWrapper(m_ours, efficient=eff)
            pml_m = pml_dist.DistributedMinerWrapper(m_pml, efficient=eff)
            tup, ptup = ours_m(x, y), pml_m(x, y)
            out[f"miner-{kind}-{eff}"] = tuple(t.cpu() for t in tup)
            out[f"miner-{kind}-{eff}/oracle"] = tuple(t.cpu() for t in ptup)
            if kind == "triplet":  # TripletMarginLoss on the mined triplets, both wrappers
                ours_l = DistributedLossWrapper(mo.losses.TripletMarginLoss(0.3, backend="cpu"),
                                                efficient=eff)
                pml_l = pml_dist.DistributedLossWrapper(pl.TripletMarginLoss(0.3),
                                                        efficient=eff)
                out[f"mined-{eff}"] = value_grad(lambda e: ours_l(e, y, tup), x)
                out[f"mined-{eff}/oracle"] = value_grad(lambda e: pml_l(e, y, ptup), x)
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()
