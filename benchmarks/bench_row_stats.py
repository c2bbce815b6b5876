"""sim_row_stats (streamed, O(B·D) memory) vs the dense torch version (holds B×M).

    python benchmarks/bench_row_stats.py --device cuda --sizes 8192,32768,65536 --dims 128,512 \
        --out benchmarks/results/row_stats_h100.json
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from harness import peak_memory, time_fn, write_result  # noqa: E402

from metrix_ops.ops import sim_row_stats  # noqa: E402


def dense(x, r, scale):
    s = scale * F.normalize(x.float(), dim=1) @ F.normalize(r.float(), dim=1).t()
    return s.max(1), torch.logsumexp(s, 1)


def matmul_floor(x, r):
    return x @ r.t()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", default="4096,16384")
    ap.add_argument("--dims", default="128,512")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for b in map(int, args.sizes.split(",")):
            for d in map(int, args.dims.split(",")):
                x = torch.randn(b, d, device=dev, dtype=dtype)
                row = {"B": b, "M": b, "D": d, "dtype": dtype_name, "chunk": args.chunk}
                cases = {"fused": lambda: sim_row_stats(x, x, 10.0, args.chunk),
                         "dense": lambda: dense(x, x, 10.0),
                         "matmul_floor": lambda: matmul_floor(x, x)}
                for name, fn in cases.items():
                    try:
                        row[name] = time_fn(fn, dev, repeats=args.repeats)
                        row[name]["peak_bytes"] = peak_memory(fn, dev)
                    except torch.OutOfMemoryError:
                        row[name] = {"error": "out of memory"}
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
                print(row, flush=True)
                rows.append(row)
    write_result(args.out, dev, rows)


if __name__ == "__main__":
    main()
