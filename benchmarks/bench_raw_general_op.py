"""The CPU general contrastive op (anchors against references) on raw rows (raw=True: each
row of X Rᵀ read as 1 − d²/2 from the norms, fused/raw_l2.py) against the same op on rows
lifted by two columns (x̃ = [x, 1 − ‖x‖²/2, 1], r̃ = [r, 1, −‖r‖²/2], what calls with ref_emb
ran until the forty-seventh session): the raw form's own cost, forward and backward timed
apart, in one process.

    python benchmarks/bench_raw_general_op.py --sizes 4096 --dims 128,512 \
        --out benchmarks/results/cpu_raw_general_op.json
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from harness import time_fn, write_result  # noqa: E402

import metrix_ops  # noqa: E402,F401  (loads the extension)


def lifted(x, r):
    nx, nr = x.square().sum(1, keepdim=True), r.square().sum(1, keepdim=True)
    return (torch.cat([x, 1 - nx / 2, torch.ones_like(nx)], 1),
            torch.cat([r, torch.ones_like(nr), nr / -2], 1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="4096")
    ap.add_argument("--dims", default="128,512")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dev, ops, rows = torch.device("cpu"), torch.ops.metrix_ops, []
    for b in map(int, args.sizes.split(",")):
        for d in map(int, args.dims.split(",")):
            g = torch.Generator().manual_seed(0)
            x, r = 3 * torch.randn(b, d, generator=g), 3 * torch.randn(b, d, generator=g)
            y, ry = torch.randint(0, b // 4, (b,), generator=g), torch.randint(0, b // 4, (b,), generator=g)
            xl, rl = lifted(x, r)
            gr = torch.ones(b)
            common = (False, False, 0.5, 6.0, -math.inf, math.inf, 2048)
            cases = {
                "raw_fwd": lambda: ops.contrastive_fwd(x, r, y, ry, *common, True),
                "lifted_fwd": lambda: ops.contrastive_fwd(xl, rl, y, ry, *common),
                "raw_bwd": lambda: ops.contrastive_bwd(gr, gr, x, r, y, ry, *common, True),
                "lifted_bwd": lambda: ops.contrastive_bwd(gr, gr, xl, rl, y, ry, *common)}
            row = {"B": b, "M": b, "D": d, "dtype": "float32"}
            for name, fn in cases.items():
                row[name] = time_fn(fn, dev, repeats=args.repeats)
            print(row, flush=True)
            rows.append(row)
    write_result(args.out, dev, rows)


if __name__ == "__main__":
    main()
