"""Prints the README's markdown table of a bench_losses.py result file, so the README shows
exactly what the JSON holds:

    python benchmarks/readme_table.py benchmarks/results/cpu_ms.json
    python benchmarks/readme_table.py --summary 4096 512 benchmarks/results/cpu_*.json

    python benchmarks/readme_table.py --gpu benchmarks/results/h200_*.json
    python benchmarks/readme_table.py --ms benchmarks/results/cpu_proxy_anchor_papers.json

(--summary: one row per file, its case at B, D, for the fused CPU op. --gpu: every row of
GPU files in milliseconds, CUDA and Triton side by side, the faster of the two against PML
and the floor. --ms: a file's table in milliseconds, for small cases.)
"""
from __future__ import annotations

import json
import sys

FUSED = ("cpu", "cuda", "triton")


def _cell(entry, fmt="{:.3f}"):
    if "median_s" in entry:
        return fmt.format(entry["median_s"])
    err = entry.get("error", "")
    if "timeout" in err:
        return err
    if "NotImplementedError" in err:
        return "not implemented"
    return "out of memory" if "allocate" in err or "out of memory" in err else "failed"


def _ms_cell(entry):
    return f"{entry['median_s'] * 1e3:.2f}" if "median_s" in entry else _cell(entry)


def _speed(x):
    return f"{x:.1f}× faster" if x >= 1 else f"{1 / x:.1f}× slower"


def _times(x):
    return f"{x:.2f}×"


# impl key -> column title, in table order; a column appears when some row measured it
COLUMNS = [("cpu", "fused cpu s"), ("cuda", "cuda s"), ("triton", "triton s"),
           ("clean", "fused clean s"), ("pml", "PML s"), ("reference", "reference s"),
           ("floor", "floor s")]


def _ratio_columns(fused):
    """(row key, title, format) of the ratios: per fused impl when the file has several."""
    out = []
    for impl in fused:
        name = "" if len(fused) == 1 else f"{impl} "
        out += [("speedup_vs_pml" if impl == "cpu" else f"{impl}_speedup_vs_pml",
                 f"{name}vs PML", _speed),
                (f"{impl}_over_floor", f"{name}over floor", _times),
                (f"{impl}_over_clean", f"{name}over clean", _times)]
    return out


def table(path: str, ms: bool = False) -> str:
    with open(path) as f:
        res = json.load(f)
    rows = res["results"]
    present = lambda k: any(k in r for r in rows)  # noqa: E731
    cols = [(k, t) for k, t in COLUMNS if present(k)]
    fused = [k for k in FUSED if present(k)]
    ratios = [x for x in _ratio_columns(fused) if present(x[0])]
    peaks = fused + ["pml"]
    with_dtype = len({r.get("dtype", "float32") for r in rows}) > 1
    with_classes = any(r.get("classes") for r in rows)  # --classes given: C beside B and D
    head = (["B", "D"] + (["C"] if with_classes else []) + (["dtype"] if with_dtype else [])
            + [t.replace(" s", " ms") if ms else t for _, t in cols]
            + [t for _, t, _ in ratios]
            + [f"{'fused' if k == 'cpu' else ('PML' if k == 'pml' else k)} peak MiB" for k in peaks])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        mib = lambda k: f"{r[k]['peak_bytes'] / 2**20:.0f}" if "peak_bytes" in r.get(k, {}) else "–"  # noqa: E731
        cells = [str(r["B"]), str(r["D"])] + ([str(r.get("classes") or r["B"] // 8)]
                                              if with_classes else [])
        cells += [r.get("dtype", "float32")] if with_dtype else []
        cells += [(_ms_cell(r[k]) if ms else _cell(r[k])) if k in r else "–" for k, _ in cols]
        cells += [fmt(r[k]) if k in r else "–" for k, _, fmt in ratios]
        cells += [mib(k) for k in peaks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(paths, b: int, d: int) -> str:
    """One row per file: the fused CPU op's case at (B, D) against PML and the floor."""
    head = ["loss", "file", "fused s", "PML s", "floor s", "vs PML", "over floor",
            "over clean", "fused peak MiB", "PML peak MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for path in paths:
        with open(path) as f:
            rows = [r for r in json.load(f)["results"] if r["B"] == b and r["D"] == d]
        for r in rows:
            mib = lambda k: f"{r[k]['peak_bytes'] / 2**20:.0f}" if "peak_bytes" in r.get(k, {}) else "–"  # noqa: E731
            cell = lambda k: _cell(r[k]) if k in r else "–"  # noqa: E731
            lines.append("| " + " | ".join([
                r["loss"], path.rsplit("/", 1)[-1], cell("cpu"), cell("pml"), cell("floor"),
                _speed(r["speedup_vs_pml"]) if "speedup_vs_pml" in r else "–",
                _times(r["cpu_over_floor"]) if "cpu_over_floor" in r else "–",
                _times(r["cpu_over_clean"]) if "cpu_over_clean" in r else "–",
                mib("cpu"), mib("pml")]) + " |")
    return "\n".join(lines)


def gpu_summary(paths) -> str:
    """Every row of GPU result files: CUDA and Triton engines in ms, the faster one's ratio
    to PML and to the product floor, peak MiB (max_memory_allocated above the inputs)."""
    head = ["loss", "B", "D", "dtype", "cuda ms", "triton ms", "PML ms", "floor ms",
            "faster engine vs PML", "over floor", "engine / PML peak MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ms = lambda e: f"{e['median_s'] * 1e3:.2f}" if "median_s" in e else _cell(e)  # noqa: E731
    for path in paths:
        with open(path) as f:
            rows = json.load(f)["results"]
        for r in rows:
            timed = [k for k in ("cuda", "triton") if "median_s" in r.get(k, {})]
            best = min(timed, key=lambda k: r[k]["median_s"]) if timed else None
            cell = lambda k: ms(r[k]) if k in r else "–"  # noqa: E731
            t = lambda k: r[k]["median_s"] if "median_s" in r.get(k, {}) else None  # noqa: E731
            mib = lambda k: f"{r[k]['peak_bytes'] / 2**20:.0f}" if "peak_bytes" in r.get(k, {}) else "–"  # noqa: E731
            lines.append("| " + " | ".join([
                r["loss"], str(r["B"]), str(r["D"]), r.get("dtype", "float32"),
                cell("cuda"), cell("triton"), cell("pml"), cell("floor"),
                f"{best} {_speed(t('pml') / t(best))}" if best and t("pml") else "–",
                f"{best} {_times(t(best) / t('floor'))}" if best and t("floor") else "–",
                f"{mib(best) if best else '–'} / {mib('pml')}"]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--gpu"]:
        print(gpu_summary(sys.argv[2:]))
    elif sys.argv[1:2] == ["--summary"]:
        print(summary(sys.argv[4:], int(sys.argv[2]), int(sys.argv[3])))
    else:
        ms = sys.argv[1:2] == ["--ms"]
        for p in sys.argv[1 + ms:]:
            print(table(p, ms))
