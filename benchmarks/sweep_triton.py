"""Tile sizes of the Triton pair-loss kernels on a GPU: fwd+bwd time of one loss per
METRIX_OPS_TRITON_TILES setting (metrix_ops/triton/pairs.py: tile_override), each checked
against the default setting's loss and gradient, so that one device call can compare several
(scripts/gpu_check.sh runs it; pick the fastest and make it the default in launch_config):

    python benchmarks/sweep_triton.py --loss MultiSimilarityLoss --sizes 8192,65536 --d 512
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = ["", "bm=64,bn=64,bd=32", "bm=128,bn=64,bd=32,warps=8", "bm=64,bn=128,bd=32,warps=8",
           "bm=64,bn=64,bd=64,stages=2", "bm=64,bn=64,bd=32,stages=4", "bm=32,bn=64,bd=64",
           "bm=128,bn=128,bd=32,warps=8,stages=2"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--loss", default="MultiSimilarityLoss")
    ap.add_argument("--sizes", default="8192,65536")
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--configs", default=";".join(CONFIGS), help="';'-separated settings")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="JSON file for the results")
    args = ap.parse_args()
    sys.path.insert(0, HERE)
    from harness import time_fn, write_result

    import metrix_ops as mo

    torch.backends.cuda.matmul.allow_tf32 = True
    dev = torch.device("cuda")
    rows = []
    for b in map(int, args.sizes.split(",")):
        g = torch.Generator(device=dev).manual_seed(b)
        x0 = torch.randn(b, args.d, device=dev, generator=g)
        y = torch.randint(0, max(2, b // 8), (b,), device=dev, generator=g)
        fn = getattr(mo.losses, args.loss)(backend="triton")
        want = None
        for cfg in args.configs.split(";"):
            os.environ["METRIX_OPS_TRITON_TILES"] = cfg
            row = {"loss": args.loss, "B": b, "D": args.d, "tiles": cfg or "default"}

            def step():
                x = x0.clone().requires_grad_(True)
                out = fn(x, y)
                out.backward()
                return out.detach(), x.grad

            try:
                got = step()
                if want is None:
                    want = got
                row["rel_err_loss"] = float((got[0] - want[0]).abs() / want[0].abs().clamp_min(1e-30))
                row["rel_err_grad"] = float((got[1] - want[1]).norm() / want[1].norm().clamp_min(1e-30))
                row.update(time_fn(step, dev, warmup=1, repeats=args.repeats))
            except Exception as e:  # noqa: BLE001  (a setting that does not compile is a result)
                row["error"] = f"{type(e).__name__}: {e}"[:200]
            print(json.dumps(row), flush=True)
            rows.append(row)
    os.environ.pop("METRIX_OPS_TRITON_TILES", None)
    if args.out:
        write_result(args.out, dev, rows)


if __name__ == "__main__":
    main()
