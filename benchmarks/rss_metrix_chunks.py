"""Peak RSS of the Metrix term in anchor chunks (fused/metrix_refs.py) on CPU tensors, with
glibc's default heap and with every large temporary mmapped (MALLOC_MMAP_THRESHOLD_), so that
the heap's retention of freed chunk temporaries is told apart from live memory.

    python benchmarks/rss_metrix_chunks.py --pairs neg_neg --b 512 --d 128 \\
        --entries 262144,1048576 --out benchmarks/results/cpu_rss_metrix_neg_neg.json

Each case runs in a fresh process: MultiSimilarityLoss's mixed term of the batch against
itself (labels in B/8 classes, λ = 0.3), forward and backward, its ru_maxrss growth over the
process's state before the call."""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys

import torch


def one(pairs: str, b: int, d: int, entries: int) -> float:
    """MiB of ru_maxrss growth over the term's forward and backward (this process)."""
    import metrix_ops as mo
    from metrix_ops.fused import metrix_refs as mr
    mr.CHUNK_ENTRIES = entries
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, d, generator=g, requires_grad=True)
    y = torch.randint(0, max(b // 8, 1), (b,), generator=g)
    mx = mo.Metrix(level="embedding", pairs=pairs, lam=0.3)
    inp = mo.spec.LossInputs(x, y, None, x, y, True, mo.distances.CosineSimilarity())
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    mr.mixed_term("MultiSimilarityLoss", {"alpha": 2.0, "beta": 50.0, "base": 0.5}, inp, mx,
                  0.3).backward()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", default="neg_neg")
    ap.add_argument("--b", type=int, default=512)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--entries", default="262144,1048576")
    ap.add_argument("--out")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(one(a.pairs, a.b, a.d, int(a.entries)))
        return
    rows = []
    for entries in (int(e) for e in a.entries.split(",")):
        row = {"B": a.b, "D": a.d, "pairs": a.pairs, "chunk_entries": entries}
        for heap, env in (("glibc_default", {}), ("mmap_threshold_65536",
                                                  {"MALLOC_MMAP_THRESHOLD_": "65536"})):
            out = subprocess.run([sys.executable, __file__, "--child", "--pairs", a.pairs,
                                  "--b", str(a.b), "--d", str(a.d), "--entries", str(entries)],
                                 env={**os.environ, **env}, capture_output=True, text=True,
                                 check=True)
            row[f"peak_rss_growth_mib_{heap}"] = float(out.stdout.strip().splitlines()[-1])
        print(json.dumps(row))
        rows.append(row)
    if a.out:
        machine = {"platform": platform.platform(), "python": platform.python_version(),
                   "torch": torch.__version__, "cpu_count": os.cpu_count(),
                   "torch_threads": torch.get_num_threads()}
        with open(a.out, "w") as f:
            json.dump({"command": "python " + " ".join(sys.argv), "machine": machine,
                       "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
