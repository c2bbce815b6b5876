"""CrossBatchMemory: a batch of B against a full bank of M embeddings (C classes), fwd+bwd of
the wrapped loss, clean and with embedding-level Metrix, and PML's CrossBatchMemory (clean:
PML has no Metrix). Each case in its own process, so that the peak RSS is its own.

    python benchmarks/bench_xbm.py --loss MultiSimilarityLoss --batch 128 --banks 8192,32768 \
        --classes 1000 --dims 128,512 --out benchmarks/results/cpu_xbm_metrix_ms.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from harness import peak_memory, time_fn, write_result  # noqa: E402

IMPLS = ("metrix", "clean", "pml")


def make(impl, loss, d, m):
    if impl == "pml":
        from pytorch_metric_learning import losses as pml
        return pml.CrossBatchMemory(getattr(pml, loss)(), d, memory_size=m)
    import metrix_ops as mo
    inner = getattr(mo.losses, loss)(metrix=mo.Metrix() if impl == "metrix" else None)
    return mo.losses.CrossBatchMemory(inner, d, memory_size=m)


def one_case(args):
    """The case's timing and peak (run in a child process)."""
    torch.manual_seed(0)
    dev = torch.device("cpu")
    xbm = make(args.impl, args.loss, args.dim, args.bank)
    # a full bank of unit rows in C classes (the state after M / B calls)
    with torch.no_grad():
        xbm.embedding_memory.copy_(torch.nn.functional.normalize(
            torch.randn(args.bank, args.dim), dim=1))
        xbm.label_memory.copy_(torch.randint(0, args.classes, (args.bank,)))
    xbm.has_been_filled = True
    x0 = torch.randn(args.batch, args.dim)
    y = torch.randint(0, args.classes, (args.batch,))

    def step():
        x = x0.clone().requires_grad_(True)
        xbm(x, y).backward()

    peak = peak_memory(step, dev)
    stats = time_fn(step, dev, warmup=1, repeats=args.repeats)
    stats["peak_bytes"] = peak
    print(json.dumps(stats))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--loss", default="MultiSimilarityLoss")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--banks", default="8192,32768")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--dims", default="128,512")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out")
    ap.add_argument("--impl", help=argparse.SUPPRESS)
    ap.add_argument("--bank", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--dim", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.impl:
        return one_case(args)
    rows = []
    for m in map(int, args.banks.split(",")):
        for d in map(int, args.dims.split(",")):
            row = {"loss": args.loss, "B": args.batch, "M": m, "D": d, "classes": args.classes}
            for impl in IMPLS:
                out = subprocess.run(
                    [sys.executable, __file__, "--impl", impl, "--loss", args.loss, "--batch",
                     str(args.batch), "--bank", str(m), "--dim", str(d), "--classes",
                     str(args.classes), "--repeats", str(args.repeats)],
                    capture_output=True, text=True)
                row[impl] = (json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0
                             else {"error": out.stderr.strip().splitlines()[-1][:300]})
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        write_result(args.out, torch.device("cpu"), rows)


if __name__ == "__main__":
    main()
