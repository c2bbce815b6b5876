"""The GPU engines' order for backend="auto", derived from benchmark results
(bench_losses.py's JSON, e.g. benchmarks/results/h200_*.json or a gpu_check.sh run's), written
to metrix_ops/gpu_order.json, which metrix_ops/backend.py loads.

Per (variant, loss, batch size): the engines measured on every row of that size (each dim,
dtype and case of the variant) ranked by their summed median times, then the engines measured
on only some rows or none (an engine that failed or was not run: after the measured ones).
Sizes with the same ranking merge into one range; the boundary between two measured sizes is
their geometric mean. The variant of a case is what its options make the call: "clean",
"metrix" (an embedding-level Metrix term), "miner" (miner=) or "expansion" (expansion=);
cases whose options route differently from the variant's plain call (Metrix against
references or with pairs="pos_pos") are left out.

    python benchmarks/derive_gpu_order.py benchmarks/results/h200_*.json \\
        --out metrix_ops/gpu_order.json
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from collections import defaultdict

ENGINES = ("cuda", "triton")
# cases whose routing differs from their variant's plain call, or whose labels differ from
# the plain cases' classes of 8 rows
SKIP = ("_refs", "_pos_pos", "_big_classes")


def case_of(row: dict, command: str) -> str:
    """The bench case (--loss key) of a result row: its "case", or the file's --loss."""
    if "case" in row:
        return row["case"]
    args = shlex.split(command)
    return args[args.index("--loss") + 1] if "--loss" in args else "unknown"


def variant_of(case: str) -> str | None:
    if any(case.endswith(s) for s in SKIP):
        return None
    if case.startswith("metrix_"):
        return "metrix"
    if case.startswith("ee_"):
        return "expansion"
    if case == "ms_miner" or case.startswith("triplet_") and case != "triplet":
        return "miner"
    return "clean"


def _median(cell) -> float | None:
    return cell["median_s"] if isinstance(cell, dict) and "median_s" in cell else None


def ranking(rows: list) -> list:
    """Engines by summed median over the rows where all of the measured-everywhere ones ran."""
    everywhere = [e for e in ENGINES if all(_median(r.get(e)) is not None for r in rows)]
    total = {e: sum(_median(r[e]) for r in rows) for e in everywhere}
    ranked = sorted(everywhere, key=lambda e: (total[e], ENGINES.index(e)))
    return ranked + [e for e in ENGINES if e not in ranked]


def ranges(by_size: dict) -> list:
    """[{"max_b": int | None, "order": [...]}] over the measured sizes, merged."""
    sizes = sorted(by_size)
    out = []
    for i, b in enumerate(sizes):
        order = ranking(by_size[b])
        if out and out[-1]["order"] == order:
            out[-1]["max_b"] = None
        else:
            out.append({"max_b": None, "order": order})
        if i + 1 < len(sizes):  # this size's range ends halfway (geometrically) to the next
            out[-1]["max_b"] = int(math.sqrt(b * sizes[i + 1]))
    out[-1]["max_b"] = None
    return out


def derive(results: list, names=None) -> dict:
    """results: loaded bench_losses.py JSON files (names: their paths, recorded)."""
    rows = defaultdict(lambda: defaultdict(list))  # (variant, loss) -> B -> rows
    devices, sources = set(), []
    for res in results:
        devices.add(res.get("machine", {}).get("device", "unknown"))
        sources.append(res.get("command", ""))
        for row in res["results"]:
            variant = variant_of(case_of(row, res.get("command", "")))
            if variant is not None and any(_median(row.get(e)) is not None for e in ENGINES):
                rows[(variant, row["loss"])][row["B"]].append(row)
    orders = defaultdict(dict)
    for (variant, loss), by_size in sorted(rows.items()):
        orders[variant][loss] = ranges(by_size)
    return {"devices": sorted(devices), "files": list(names or []), "commands": sources,
            "orders": dict(orders)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", help="bench_losses.py JSON files")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    loaded = []
    for path in args.results:
        with open(path) as f:
            loaded.append(json.load(f))
    table = derive(loaded, args.results)
    with open(args.out, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    for variant, losses in table["orders"].items():
        for loss, rs in losses.items():
            print(variant, loss, "; ".join(f"B <= {r['max_b']}: {'/'.join(r['order'])}"
                                          if r["max_b"] else '/'.join(r["order"]) for r in rs))


if __name__ == "__main__":
    sys.exit(main())
