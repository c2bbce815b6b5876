"""Interleaved A/B of the CPU kernels' SIMD levels (METRIX_OPS_SIMD) on the proxy losses'
embedding-level Metrix ops (ops/proxy_metrix: ProxyAnchor's terms, ProxyNCA's rows): the
forward, the backward and the whole call, each timed. Each round runs one fresh process per
level, alternating, so that a noisy VM's drift falls on both levels alike. The level is fixed
at a process's first kernel call, hence the processes.

    python benchmarks/simd_ab.py --levels avx2,avx512 --shapes 180x3997,180x100 --rounds 3 \
        [--out benchmarks/results/cpu_proxy_metrix_simd_ab.json]

Rows are unit vectors (D = 512), labels half in 50 classes, half spread over C; λ = 0.3."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _child(b: int, c: int, repeats: int) -> dict:
    """Median seconds of fwd+bwd of each op at this process's level."""
    import torch
    import torch.nn.functional as F

    from metrix_ops.ops.proxy_metrix import proxy_anchor_metrix_terms, proxy_nca_metrix_rows
    torch.manual_seed(0)
    x = F.normalize(torch.randn(b, 512), dim=1).requires_grad_()
    p = F.normalize(torch.randn(c, 512), dim=1).requires_grad_()
    y = torch.randint(0, c, (b,))
    y[: b // 2] = torch.randint(0, min(50, c), (b // 2,))

    def anchor():
        pos, neg = proxy_anchor_metrix_terms(x, p, y, 32.0, 0.1, 0.3, False)
        return pos.sum() + neg.sum()

    def nca():
        return proxy_nca_metrix_rows(x, p, y, 3.0, 1, 0.3, False).sum()
    out = {"level": torch.ops.metrix_ops._simd_level()}
    for name, f in (("ProxyAnchor", anchor), ("ProxyNCA", nca)):
        f().backward()  # warm-up
        fwd, bwd, tot = [], [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            loss = f()
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
            tot.append(t2 - t0)
        # the medians of each side and of the whole call, each taken on its own
        out[name] = statistics.median(tot)
        out[name + "_fwd"] = statistics.median(fwd)
        out[name + "_bwd"] = statistics.median(bwd)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--levels", default="avx2,avx512")
    ap.add_argument("--shapes", default="180x3997,180x100", help="BxC, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        b, c = map(int, args.child.split("x"))
        print(json.dumps(_child(b, c, args.repeats)))
        return
    rows = []
    for shape in args.shapes.split(","):
        for rnd in range(args.rounds):
            for level in args.levels.split(","):
                env = dict(os.environ, METRIX_OPS_SIMD=level)
                res = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", shape,
                                      "--repeats", str(args.repeats)], env=env, check=True,
                                     capture_output=True, text=True)
                r = json.loads(res.stdout.strip().splitlines()[-1])
                rows.append({"shape": shape, "round": rnd, **r})
                print(shape, rnd, level, " ".join(
                    f"{k} {1e3 * r[k]:.1f} ms (fwd {1e3 * r[k + '_fwd']:.1f}, "
                    f"bwd {1e3 * r[k + '_bwd']:.1f})" for k in ("ProxyAnchor", "ProxyNCA")))
    if args.out:
        sys.path.insert(0, HERE)
        import torch
        from harness import write_result
        write_result(args.out, torch.device("cpu"), rows)


if __name__ == "__main__":
    main()
