"""Host syncs and launches per loss call, counted on the CPU. Host syncs: the reads of tensor
data (and the ops whose output shape depends on the data) that the library's Python glue makes
during one forward + backward. Launches: the kernels the call queues (aten ops that run a
kernel, Triton kernels, compiled ops), each a few microseconds of fixed cost on a GPU. On CUDA tensors each one waits for the GPU queue to drain, so between launches it
costs the GPU idle time, and after the forward is queued it keeps the backward from being
queued early. The glue is the same Python on CPU and CUDA tensors, so counting here tells what
a GPU run will wait on, without a GPU.

    TRITON_INTERPRET=1 python benchmarks/host_syncs.py [--backend triton|cpu] [--batch 64]
        [--only NAME ...] [--out FILE.json]

What is counted, and how reads and launches are charged: `tests/host_reads.py`,
`tests/launch_counter.py`."""
from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.normpath(os.path.join(HERE, "..", "tests")))
sys.path.insert(0, os.path.normpath(os.path.join(HERE, "..")))
sys.path.insert(0, HERE)

from host_reads import reads_per_step  # noqa: E402
from launch_counter import launches_per_step  # noqa: E402


def cases(backend, classes):
    import metrix_ops as mo
    L, mi = mo.losses, mo.miners
    kw = dict(backend=backend)
    return {
        "MultiSimilarityLoss": lambda: L.MultiSimilarityLoss(**kw),
        "ContrastiveLoss": lambda: L.ContrastiveLoss(**kw),
        "CircleLoss": lambda: L.CircleLoss(**kw),
        "NTXentLoss": lambda: L.NTXentLoss(**kw),
        "SupConLoss": lambda: L.SupConLoss(**kw),
        "LiftedStructureLoss": lambda: L.LiftedStructureLoss(**kw),
        "GeneralizedLiftedStructureLoss": lambda: L.GeneralizedLiftedStructureLoss(**kw),
        "TripletMarginLoss": lambda: L.TripletMarginLoss(**kw),
        "HPHNTripletLoss": lambda: L.HPHNTripletLoss(**kw),
        "NPairsLoss": lambda: L.NPairsLoss(**kw),
        "ProxyAnchorLoss": lambda: L.ProxyAnchorLoss(classes, 32, **kw),
        "ProxyNCALoss": lambda: L.ProxyNCALoss(classes, 32, **kw),
        "MS+Metrix": lambda: L.MultiSimilarityLoss(metrix=mo.Metrix(), **kw),
        "Contrastive+Metrix": lambda: L.ContrastiveLoss(metrix=mo.Metrix(), **kw),
        "ProxyAnchor+Metrix": lambda: L.ProxyAnchorLoss(classes, 32, metrix=mo.Metrix(), **kw),
        "MS+EE": lambda: L.MultiSimilarityLoss(expansion=mo.Expansion(n_points=4), **kw),
        "HPHN+EE": lambda: L.HPHNTripletLoss(expansion=mo.Expansion(n_points=4), **kw),
        "MS+miner": lambda: L.MultiSimilarityLoss(miner=mi.MultiSimilarityMiner(), **kw),
        "Triplet+semihard": lambda: L.TripletMarginLoss(
            miner=mi.TripletMarginMiner(type_of_triplets="semihard"), **kw),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--classes", type=int, default=8)
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("set TRITON_INTERPRET=1: the Triton kernels run on the CPU here")
    if args.backend == "triton":
        # what a CUDA run queues: the row normalisation as its one Triton kernel each way
        # (ops/unit_rows.one_kernel takes CUDA tensors only; the interpreter runs it here)
        from metrix_ops.ops import unit_rows
        unit_rows.one_kernel = lambda t: t.dim() == 2
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(args.batch, 32, generator=gen)
    labels = torch.randint(0, args.classes, (args.batch,), generator=gen)
    rows = []
    for name, make in cases(args.backend, args.classes).items():
        if args.only and name not in args.only:
            continue
        c = reads_per_step(make(), x0, labels)
        n = launches_per_step(make(), x0, labels)
        rows.append({"loss": name, "backend": args.backend, "batch": args.batch,
                     "host_syncs": c.total, "sites": dict(c.sites),
                     "launches": n.total, "launches_by_kind": n.by_kind(),
                     "launch_sites": dict(n.sites)})
        print(f"{name:32s} syncs {c.total:2d}, launches {n.total:3d} {n.by_kind()}  "
              + ", ".join(f"{k} ×{v}" for k, v in c.sites.items()))
    if args.out:
        from harness import write_result
        write_result(args.out, torch.device("cpu"), rows)


if __name__ == "__main__":
    main()
