"""The reference training run in one process against the same run under torchrun (DDP) with
N processes: training seconds (the run's own "seconds", evaluation included), wall seconds
(process start included) and the final retrieval metrics, each configuration `--repeats`
times.

    python benchmarks/bench_train_ddp.py --procs 2 --epochs 5 --repeats 2 \\
        --out benchmarks/results/cpu_train_ddp.json

On the CPU each process gets OMP_NUM_THREADS = cores / procs (the one-process run all of
them)."""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_run(procs: int, epochs: int, extra: list) -> dict:
    train = ["-m", "metrix_ops.train", "--epochs", str(epochs), "--eval-every", str(epochs),
             "--quiet"] + extra
    threads = max(1, (os.cpu_count() or 1) // procs)
    with tempfile.TemporaryDirectory() as d:
        if procs > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}",
                   f"--master_port={free_port()}"] + train + ["--out", d]
        else:
            cmd = [sys.executable] + train + ["--out", d]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        start = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
        wall = time.perf_counter() - start
        if out.returncode != 0:
            return {"error": out.stderr[-300:]}
        (name,) = os.listdir(d)
        with open(os.path.join(d, name)) as f:
            res = json.load(f)
    final = res["final"]
    return {"procs": procs, "threads_per_process": threads, "train_seconds": res["seconds"],
            "wall_seconds": wall, "precision_at_1": final["precision_at_1"],
            "mean_average_precision_at_r": final["mean_average_precision_at_r"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--train-args", default="", help="more metrix-train options, quoted")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import torch
    from harness import write_result
    extra = args.train_args.split()
    rows = []
    for procs in (1, args.procs):
        for _ in range(args.repeats):
            rows.append(one_run(procs, args.epochs, extra))
            print(json.dumps(rows[-1]), flush=True)
    write_result(args.out, torch.device("cpu"), rows)


if __name__ == "__main__":
    main()
