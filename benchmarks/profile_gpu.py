"""Where a fused loss's GPU time goes: torch.profiler over a few fwd+bwd steps of one loss and
engine, printing the kernels by device time and the step's wall time against the summed
kernel time (a wall time well above the kernels' sum is host overhead: Python glue, launches,
synchronising checks). Run by scripts/gpu_check.sh:

    python benchmarks/profile_gpu.py --loss MultiSimilarityLoss --backend cuda --b 8192 --d 512
"""
from __future__ import annotations

import argparse
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--loss", default="MultiSimilarityLoss")
    ap.add_argument("--backend", default="cuda")
    ap.add_argument("--b", type=int, default=8192)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rows", type=int, default=14)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of this script")
    args = ap.parse_args()
    import metrix_ops as mo
    from torch.profiler import ProfilerActivity, profile

    torch.backends.cuda.matmul.allow_tf32 = True
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    g = torch.Generator(device=dev).manual_seed(0)
    x0 = torch.randn(args.b, args.d, device=dev, generator=g)
    n_classes = max(2, args.b // 8)
    y = torch.randint(0, n_classes, (args.b,), device=dev, generator=g)
    cls = getattr(mo.losses, args.loss)
    proxy = args.loss.startswith("Proxy")
    fn = (cls(n_classes, args.d, backend=args.backend) if proxy else cls(backend=args.backend)).to(dev)

    def step():
        x = x0.clone().requires_grad_(True)
        fn(x, y).backward()

    for _ in range(3):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    wall = (time.perf_counter() - t0) / args.steps
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(args.steps):
            step()
        sync()
    events = prof.key_averages()
    # device time of the kernels alone (self time: no double counting of nested ops)
    attr = ("self_device_time_total" if hasattr(events[0], "self_device_time_total")
            else "self_cuda_time_total") if cuda else "self_cpu_time_total"
    kernels = sum(getattr(e, attr) for e in events) / 1e3 / args.steps
    print(f"{args.loss} backend={args.backend} B={args.b} D={args.d}: wall {wall * 1e3:.2f} ms "
          f"per fwd+bwd, device time {kernels:.2f} ms ({100 * kernels / (wall * 1e3):.0f}% busy)")
    print(events.table(sort_by=attr, row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
