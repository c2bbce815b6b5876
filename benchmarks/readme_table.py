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


def table(path: str) -> str:
    with open(path) as f:
        res = json.load(f)
    lines = ["| B | D | fused cpu s | PML s | reference s | floor s | vs PML | over floor "
             "| fused peak MiB | PML peak MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["results"]:
        mib = lambda k: f"{r[k]['peak_bytes'] / 2**20:.0f}" if "peak_bytes" in r.get(k, {}) else "–"  # noqa: E731
        speed = f"{r['speedup_vs_pml']:.1f}× faster" if "speedup_vs_pml" in r else "–"
        over = f"{r['cpu_over_floor']:.2f}×" if "cpu_over_floor" in r else "–"
        lines.append(f"| {r['B']} | {r['D']} | {_cell(r['cpu'])} | {_cell(r['pml'])} | "
                     f"{_cell(r['reference'])} | {_cell(r['floor'])} | {speed} | {over} | "
                     f"{mib('cpu')} | {mib('pml')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(table(p))
