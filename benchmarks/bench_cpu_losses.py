"""CPU forward+backward time and peak memory: metrix_ops (cpu / reference) vs PML vs the
matrix-product floor (the products the loss needs, timed alone). Each case runs in its own
process so that its peak memory (RSS growth) is its own.

    python benchmarks/bench_cpu_losses.py --sizes 1024,4096 --dims 128,512 \
        --out benchmarks/results/cpu_ms.json
    python benchmarks/bench_cpu_losses.py --loss contrastive --sizes 1024,4096 --dims 128,512 \
        --out benchmarks/results/cpu_contrastive.json
    python benchmarks/bench_cpu_losses.py --loss triplet --sizes 1024,4096 --dims 128,512 \
        --out benchmarks/results/cpu_triplet.json
    python benchmarks/bench_cpu_losses.py --loss proxy_anchor --sizes 1024,4096 --dims 128,512 \
        --out benchmarks/results/cpu_proxy_anchor.json
    python benchmarks/bench_cpu_losses.py --loss metrix_ms --impls cpu,clean,pml,floor \
        --sizes 1024,4096 --dims 128,512 --out benchmarks/results/cpu_metrix_ms.json
    python benchmarks/bench_cpu_losses.py --loss ee_hphn --impls cpu,clean,pml,floor \
        --sizes 1024,4096 --dims 128,512 --out benchmarks/results/cpu_ee_hphn.json

impl "clean" is our fused loss without its augmentation (Metrix or EE): the time the
augmented loss is compared against (`cpu_over_clean`).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

# --loss name -> (PML class, metrix_ops class, floor). "gram": S = X Xᵀ, G X and Gᵀ X, the
# three products every exact loss of the Gram matrix needs; "proxy": S = X Pᵀ, G P and Gᵀ X
# against C = B // 8 proxies (the label range below), whose gradient is timed too.
LOSSES = {"multi_similarity": ("MultiSimilarityLoss", "MultiSimilarityLoss", "gram"),
          "contrastive": ("ContrastiveLoss", "ContrastiveLoss", "gram"),
          "triplet": ("TripletMarginLoss", "TripletMarginLoss", "gram"),
          "proxy_anchor": ("ProxyAnchorLoss", "ProxyAnchorLoss", "proxy"),
          # MS + embedding-level Metrix (pos_neg, λ drawn per call, weight 0.4). PML has no
          # Metrix: its column is PML's clean MS, the loss a user would run without us.
          "metrix_ms": ("MultiSimilarityLoss", "MultiSimilarityLoss", "gram"),
          # HPHN triplet with Embedding Expansion (n_points=8, pairs="all"). PML has no EE:
          # its "pml" column is the clean loss, TripletMarginLoss on BatchHardMiner triplets
          # (= HPHN without expansion).
          "ee_hphn": ("TripletMarginLoss", "HPHNTripletLoss", "gram")}

# --loss name -> the options that make our module the augmented loss
AUGMENT = {"metrix_ms": lambda mo: {"metrix": mo.Metrix()},
           "ee_hphn": lambda mo: {"expansion": mo.Expansion(n_points=8, pairs="all")}}


def make_loss(loss, impl, ctor_args=()):
    """The loss module of `impl` (pml, cpu, reference, clean) for --loss `loss`."""
    if impl == "pml":
        from pytorch_metric_learning import losses as pl
        if loss == "ee_hphn":
            from pytorch_metric_learning import miners as pm
            from pytorch_metric_learning import reducers as pr
            fn, miner = pl.TripletMarginLoss(margin=0.2, reducer=pr.MeanReducer()), pm.BatchHardMiner()
            return lambda x, y: fn(x, y, miner(x, y))
        return getattr(pl, LOSSES[loss][0])(*ctor_args)
    import metrix_ops as mo
    kw = AUGMENT[loss](mo) if loss in AUGMENT and impl != "clean" else {}
    return getattr(mo.losses, LOSSES[loss][1])(*ctor_args, backend="cpu" if impl == "clean" else impl,
                                               **kw)


def run_case(loss, impl, b, d, repeats):
    import torch

    sys.path.insert(0, HERE)
    from harness import peak_memory, time_fn

    torch.manual_seed(0)
    x0 = torch.randn(b, d)
    n_classes = max(2, b // 8)
    y = torch.randint(0, n_classes, (b,))
    dev = torch.device("cpu")
    proxy = LOSSES[loss][2] == "proxy"
    ctor_args = (n_classes, d) if proxy else ()
    if impl == "floor" and proxy:
        p0 = torch.randn(n_classes, d)

        def step():  # S = X Pᵀ, then dX = G P and dP = Gᵀ X
            s = x0 @ p0.t()
            return s @ p0, s.t() @ x0
    elif impl == "floor":
        # S = X Xᵀ, then dX = G X and dR = Gᵀ X: the three products any exact method needs
        def step():
            s = x0 @ x0.t()
            return s @ x0, s.t() @ x0
    else:
        loss_fn = make_loss(loss, impl, ctor_args)

        def step():
            x = x0.clone().requires_grad_(True)
            if isinstance(loss_fn, torch.nn.Module):
                loss_fn.zero_grad(set_to_none=True)  # proxies: a fresh gradient each step
            loss_fn(x, y).backward()
            return x.grad
    peak = peak_memory(step, dev)  # first: RSS peaks are sticky within a process
    stats = time_fn(step, dev, warmup=1, repeats=repeats)
    stats["peak_bytes"] = peak
    return stats


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--loss", default="multi_similarity", choices=sorted(LOSSES))
    ap.add_argument("--timeout", type=float, default=900, help="seconds per case (process)")
    ap.add_argument("--mem-limit-gb", type=float, default=0,
                    help="address-space cap per case (0: none); a shared box survives PML's OOMs")
    ap.add_argument("--sizes", default="1024,4096")
    ap.add_argument("--dims", default="128,512")
    ap.add_argument("--impls", default="cpu,pml,reference,floor")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", required=True)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:  # child process: one case, result as JSON on stdout
        impl, b, d = args.case.split(":")
        if args.mem_limit_gb > 0:
            import resource
            cap = int(args.mem_limit_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        print(json.dumps(run_case(args.loss, impl, int(b), int(d), args.repeats)))
        return
    sys.path.insert(0, HERE)
    import torch
    from harness import write_result

    rows = []
    for b in map(int, args.sizes.split(",")):
        for d in map(int, args.dims.split(",")):
            row = {"loss": LOSSES[args.loss][1], "B": b, "D": d, "dtype": "float32"}
            for impl in args.impls.split(","):
                cmd = [sys.executable, __file__, "--loss", args.loss, "--case", f"{impl}:{b}:{d}",
                       "--repeats", str(args.repeats), "--mem-limit-gb", str(args.mem_limit_gb),
                       "--out", "-"]
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                except subprocess.TimeoutExpired:
                    row[impl] = {"error": f"timeout after {args.timeout:.0f} s"}
                    continue
                err = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
                row[impl] = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 \
                    else {"error": err[:200]}
            if "cpu" in row and "pml" in row and "median_s" in row["cpu"] and "median_s" in row["pml"]:
                row["speedup_vs_pml"] = row["pml"]["median_s"] / row["cpu"]["median_s"]
                if "floor" in row:
                    row["cpu_over_floor"] = row["cpu"]["median_s"] / row["floor"]["median_s"]
                row["peak_ratio_cpu_over_pml"] = row["cpu"]["peak_bytes"] / max(1, row["pml"]["peak_bytes"])
            if "median_s" in row.get("cpu", {}) and "median_s" in row.get("clean", {}):
                row["cpu_over_clean"] = row["cpu"]["median_s"] / row["clean"]["median_s"]
            print(json.dumps(row), flush=True)
            rows.append(row)
    write_result(args.out, torch.device("cpu"), rows)


if __name__ == "__main__":
    main()
