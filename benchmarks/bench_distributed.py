"""DistributedLossWrapper in a real process group (gloo, CPU; one thread per rank): forward +
backward time and peak RSS growth per rank of metrix_ops' wrapper around a fused loss against
PML's wrapper around PML's loss, efficient=False (every rank: the whole gathered batch) and
True (each rank: its rows against the gathered batch; PML lists B × world·B pairs, the fused
op streams them). Each case in fresh processes, so that peak RSS is honest.

    python benchmarks/bench_distributed.py --sizes 1024,4096 --dim 128 --world 2 \\
        --out benchmarks/results/cpu_distributed_ms.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import peak_memory, time_fn, write_result  # noqa: E402


def _rank(rank, world, store, impl, efficient, b, d, repeats, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(b, d, generator=g).requires_grad_(True)
    y = torch.randint(0, max(2, world * b // 8), (b,), generator=g)
    if impl == "pml":
        import pytorch_metric_learning.losses as pl
        from pytorch_metric_learning.utils.distributed import DistributedLossWrapper
        fn = DistributedLossWrapper(pl.MultiSimilarityLoss(), efficient=efficient)
    else:
        import metrix_ops as mo
        from metrix_ops.utils.distributed import DistributedLossWrapper
        fn = DistributedLossWrapper(mo.losses.MultiSimilarityLoss(backend="cpu"),
                                    efficient=efficient)

    def step():
        x.grad = None
        fn(x, y).backward()
    dev = torch.device("cpu")
    peak = peak_memory(step, dev)  # the first call: the allocator's peak before any reuse
    timing = time_fn(step, dev, warmup=1, repeats=repeats)
    with open(os.path.join(out, f"{rank}.json"), "w") as f:
        json.dump(dict(timing, peak_bytes=peak), f)
    dist.destroy_process_group()


def run_case(world, impl, efficient, b, d, repeats):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(world, os.path.join(tmp, "store"), impl, efficient, b, d, repeats,
                              tmp), nprocs=world)
        ranks = [json.load(open(os.path.join(tmp, f"{r}.json"))) for r in range(world)]
    # the slowest rank sets the step's time; the largest peak the memory needed per rank
    worst = max(ranks, key=lambda r: r["median_s"])
    return dict(worst, peak_bytes=max(r["peak_bytes"] for r in ranks))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1024,4096", help="rows per rank")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/cpu_distributed_ms.json")
    args = ap.parse_args()
    rows = []
    for b in (int(s) for s in args.sizes.split(",")):
        for efficient in (False, True):
            row = {"loss": "MultiSimilarityLoss", "B_per_rank": b, "D": args.dim,
                   "world": args.world, "efficient": efficient}
            for impl in ("metrix_ops", "pml"):
                row[impl] = run_case(args.world, impl, efficient, b, args.dim, args.repeats)
            row["speedup_vs_pml"] = row["pml"]["median_s"] / row["metrix_ops"]["median_s"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    write_result(args.out, torch.device("cpu"), rows)


if __name__ == "__main__":
    main()
