"""Prints the README's markdown table of a bench_cpu_losses.py result file, so the README
shows exactly what the JSON holds:

    python benchmarks/readme_table.py benchmarks/results/cpu_ms.json
"""
from __future__ import annotations

import json
import sys


def _cell(entry, fmt="{:.3f}"):
    if "median_s" in entry:
        return fmt.format(entry["median_s"])
    err = entry.get("error", "")
    if "timeout" in err:
        return err
    return "out of memory" if "allocate" in err else "failed"


def _speed(x):
    return f"{x:.1f}× faster" if x >= 1 else f"{1 / x:.1f}× slower"


# impl key -> column title, in table order; a column appears when some row measured it
COLUMNS = [("cpu", "fused cpu s"), ("clean", "fused clean s"), ("pml", "PML s"),
           ("reference", "reference s"), ("floor", "floor s")]


def table(path: str) -> str:
    with open(path) as f:
        res = json.load(f)
    rows = res["results"]
    cols = [(k, t) for k, t in COLUMNS if any(k in r for r in rows)]
    ratios = [("speedup_vs_pml", "vs PML", _speed),
              ("cpu_over_floor", "over floor", "{:.2f}×"),
              ("cpu_over_clean", "over clean", "{:.2f}×")]
    ratios = [x for x in ratios if any(x[0] in r for r in rows)]
    head = ["B", "D"] + [t for _, t in cols] + [t for _, t, _ in ratios] + ["fused peak MiB",
                                                                         "PML peak MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        mib = lambda k: f"{r[k]['peak_bytes'] / 2**20:.0f}" if "peak_bytes" in r.get(k, {}) else "–"  # noqa: E731
        cells = [str(r["B"]), str(r["D"])] + [_cell(r[k]) if k in r else "–" for k, _ in cols]
        cells += [(fmt(r[k]) if callable(fmt) else fmt.format(r[k])) if k in r else "–"
                  for k, _, fmt in ratios]
        cells += [mib("cpu"), mib("pml")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(table(p))
