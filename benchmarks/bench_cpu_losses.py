"""CPU forward+backward time and peak memory: metrix_ops (cpu / reference) vs PML vs the
matrix-product floor (the products the loss needs, timed alone). Each case runs in its own
process so that its peak memory (RSS growth) is its own.

    python benchmarks/bench_cpu_losses.py --sizes 1024,4096 --dims 128,512 \
        --out benchmarks/results/cpu_ms.json
    python benchmarks/bench_cpu_losses.py --loss contrastive --sizes 1024,4096 --dims 128,512 \
        --out benchmarks/results/cpu_contrastive.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# --loss: PML class name of each benchmarked loss (ours has the same name and defaults)
LOSSES = {"multi_similarity": "MultiSimilarityLoss", "contrastive": "ContrastiveLoss"}


def run_case(impl, b, d, repeats, loss_name="MultiSimilarityLoss"):
    import torch

    sys.path.insert(0, HERE)
    from harness import peak_memory, time_fn

    torch.manual_seed(0)
    x0 = torch.randn(b, d)
    y = torch.randint(0, max(2, b // 8), (b,))
    dev = torch.device("cpu")
    if impl == "floor":
        # S = X Xᵀ, then dX = G X and dR = Gᵀ X: the three products any exact method needs
        def step():
            s = x0 @ x0.t()
            return s @ x0, s.t() @ x0
    else:
        if impl == "pml":
            from pytorch_metric_learning import losses as pml_losses
            loss_fn = getattr(pml_losses, loss_name)()
        else:
            import metrix_ops as mo
            loss_fn = getattr(mo.losses, loss_name)(backend=impl)

        def step():
            x = x0.clone().requires_grad_(True)
            loss_fn(x, y).backward()
            return x.grad
    peak = peak_memory(step, dev)  # first: RSS peaks are sticky within a process
    stats = time_fn(step, dev, warmup=1, repeats=repeats)
    stats["peak_bytes"] = peak
    return stats


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--loss", choices=sorted(LOSSES), default="multi_similarity")
    ap.add_argument("--sizes", default="1024,4096")
    ap.add_argument("--dims", default="128,512")
    ap.add_argument("--impls", default="cpu,pml,reference,floor")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", required=True)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:  # child process: one case, result as JSON on stdout
        impl, b, d = args.case.split(":")
        print(json.dumps(run_case(impl, int(b), int(d), args.repeats, LOSSES[args.loss])))
        return
    sys.path.insert(0, HERE)
    import torch
    from harness import write_result

    rows = []
    for b in map(int, args.sizes.split(",")):
        for d in map(int, args.dims.split(",")):
            row = {"loss": LOSSES[args.loss], "B": b, "D": d, "dtype": "float32"}
            for impl in args.impls.split(","):
                proc = subprocess.run([sys.executable, __file__, "--case", f"{impl}:{b}:{d}",
                                       "--repeats", str(args.repeats), "--loss", args.loss,
                                       "--out", "-"],
                                      capture_output=True, text=True)
                row[impl] = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 \
                    else {"error": proc.stderr.strip().splitlines()[-1][:200]}
            if "cpu" in row and "pml" in row and "median_s" in row["cpu"] and "median_s" in row["pml"]:
                row["speedup_vs_pml"] = row["pml"]["median_s"] / row["cpu"]["median_s"]
                if "floor" in row:
                    row["cpu_over_floor"] = row["cpu"]["median_s"] / row["floor"]["median_s"]
                row["peak_ratio_cpu_over_pml"] = row["cpu"]["peak_bytes"] / max(1, row["pml"]["peak_bytes"])
            print(json.dumps(row), flush=True)
            rows.append(row)
    write_result(args.out, torch.device("cpu"), rows)


if __name__ == "__main__":
    main()
