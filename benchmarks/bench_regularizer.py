"""What an embedding regularizer adds to a fused loss: MultiSimilarityLoss forward + backward
on the CPU engine, without and with LpRegularizer (O(B·D) beside the op's products), median
and p20/p80 of the repeats.

    python benchmarks/bench_regularizer.py --out benchmarks/results/cpu_ms_regularizer.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

import metrix_ops as mo


def times(loss, x, y, repeats: int):
    ts = []
    for _ in range(repeats):
        e = x.clone().requires_grad_(True)
        t = time.perf_counter()
        loss(e, y).backward()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return {"median_s": statistics.median(ts), "p20_s": ts[len(ts) // 5],
            "p80_s": ts[(4 * len(ts)) // 5]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out")
    a = ap.parse_args()
    torch.manual_seed(0)
    x, y = torch.randn(a.batch, a.dim), torch.randint(0, a.batch // 8, (a.batch,))
    reg = mo.regularizers.LpRegularizer(power=2)
    res = {"clean": times(mo.losses.MultiSimilarityLoss(backend="cpu"), x, y, a.repeats),
           "lp_regularizer": times(mo.losses.MultiSimilarityLoss(
               backend="cpu", embedding_regularizer=reg, embedding_reg_weight=0.01),
               x, y, a.repeats)}
    out = {"command": "python " + " ".join(sys.argv),
           "what": f"MultiSimilarityLoss fwd+bwd, backend=cpu, B={a.batch}, D={a.dim}, fp32",
           "machine": {"platform": platform.platform(), "python": platform.python_version(),
                       "torch": torch.__version__, "cpu_count": os.cpu_count(),
                       "torch_threads": torch.get_num_threads()},
           "results": res}
    text = json.dumps(out, indent=1)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
