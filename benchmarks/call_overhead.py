"""Where one loss call (forward + backward) spends its time on the CPU at small batches: in the
fused op (its forward and backward), in the other ATen ops that the library's Python runs
around it (input checks, labels, reducer, autograd nodes), and outside any op (the Python
interpreter and the autograd engine). At small B the op's arithmetic is tiny, so the rest is
the per-call cost a GPU run also pays on its host.

    python benchmarks/call_overhead.py [--losses multi_similarity,contrastive,...]
        [--sizes 16,64,256] [--dim 128] [--repeats 200] [--budget-s 5] [--profiled 50]
        [--hotspots 12]
        --out benchmarks/results/cpu_call_overhead.json

- wall: medians / p20 / p80 of unprofiled steps (harness.time_fn), for the fused CPU engine and
  for PML, the same step as bench_losses.py (its `case_step`); fewer than --repeats where
  they would take over --budget-s.
- split: torch.profiler over `--profiled` further steps. "op": the outermost `metrix_ops::`
  events (the loss op forward and backward, wherever autograd nests them, and the compiled
  helpers: unit_rows, pair_counts; `op_names` counts each); "glue ops": every other
  top-level event (ATen ops, autograd nodes) less the op time inside it; "outside ops": the
  profiled step's wall less both. The profiler costs a few µs per event, so its steps are slower
  than the unprofiled medians: compare the parts with each other, not with the wall medians.
- hotspots: the Python functions with the most own time under cProfile over the same number of
  steps (cProfile slows Python several-fold: a ranking, not a timing)."""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.normpath(os.path.join(HERE, "..")))

from bench_losses import LOSSES, case_step  # noqa: E402
from harness import time_fn, write_result  # noqa: E402

OP_PREFIX = "metrix_ops::"


def _op_time(event, names: dict):
    """Inclusive µs and count of the outermost metrix_ops events at or under `event`; each
    one's name counted in `names`."""
    if event.name.startswith(OP_PREFIX):
        names[event.name] = names.get(event.name, 0) + 1
        return event.cpu_time_total, 1
    total, n = 0.0, 0
    for child in event.cpu_children:
        t, k = _op_time(child, names)
        total, n = total + t, n + k
    return total, n


def profiled_split(step, steps: int) -> dict:
    """The three parts of a step, in µs per step, from torch.profiler's CPU events."""
    with profile(activities=[ProfilerActivity.CPU]):  # the profiler's own first-use cost
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        wall_us = (time.perf_counter() - t0) * 1e6
    op_us = glue_us = 0.0
    op_n = glue_n = 0
    glue_names: dict = {}
    op_names: dict = {}
    for e in prof.events():
        if e.cpu_parent is not None:
            continue
        t, k = _op_time(e, op_names)
        op_us, op_n = op_us + t, op_n + k
        glue_us += e.cpu_time_total - t
        if k == 0:  # a top-level event with no fused op inside: one glue op
            glue_n += 1
            glue_names[e.name] = glue_names.get(e.name, 0.0) + e.cpu_time_total
    top = sorted(glue_names.items(), key=lambda kv: -kv[1])[:10]
    return {"profiled_step_us": wall_us / steps, "op_us": op_us / steps,
            "glue_ops_us": glue_us / steps, "outside_ops_us": (wall_us - op_us - glue_us) / steps,
            "op_calls": op_n / steps, "op_names": {k: n / steps for k, n in sorted(op_names.items())},
            "glue_ops": glue_n / steps,
            "top_glue_ops_us": {name: t / steps for name, t in top}}


def python_hotspots(step, steps: int, n: int) -> list:
    """The n functions with the most own time under cProfile, as 'file:line(function)'."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    prof.disable()
    stats = pstats.Stats(prof).stats  # {(file, line, fn): (cc, nc, tottime, cumtime, callers)}
    root = os.path.normpath(os.path.join(HERE, ".."))
    rows = []
    for (file, line, fn), (_, ncalls, tottime, cumtime, _) in stats.items():
        where = os.path.relpath(file, root) if file.startswith(root) else os.path.basename(file)
        rows.append({"function": f"{where}:{line}({fn})", "calls_per_step": ncalls / steps,
                     "own_us_per_step": tottime / steps * 1e6,
                     "cumulative_us_per_step": cumtime / steps * 1e6})
    rows.sort(key=lambda r: -r["own_us_per_step"])
    return rows[:n]


def affordable(step, repeats: int, budget_s: float) -> int:
    """`repeats`, or fewer (at least 5) where they would take over budget_s: PML's NTXent
    takes seconds a call at B = 256 on the CPU."""
    t0 = time.perf_counter()
    step()
    return max(5, min(repeats, int(budget_s / max(time.perf_counter() - t0, 1e-9))))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--losses", default="multi_similarity,contrastive,ntxent,proxy_anchor,triplet")
    ap.add_argument("--sizes", default="16,64,256")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--budget-s", type=float, default=5.0,
                    help="seconds of timed steps per impl and case, at most (at least 5 steps)")
    ap.add_argument("--profiled", type=int, default=50)
    ap.add_argument("--hotspots", type=int, default=12)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    losses = args.losses.split(",")
    unknown = sorted(set(losses) - set(LOSSES))
    if unknown:
        ap.error(f"--losses: unknown {unknown}; known: {sorted(LOSSES)}")
    cpu = torch.device("cpu")
    rows = []
    for loss in losses:
        for b in (int(s) for s in args.sizes.split(",")):
            row = {"loss": LOSSES[loss][1], "case": loss, "B": b, "D": args.dim}
            steps = {impl: case_step(loss, impl, b, args.dim) for impl in ("cpu", "pml")}
            for impl, step in steps.items():
                row[impl] = time_fn(step, cpu, warmup=20,
                                    repeats=affordable(step, args.repeats, args.budget_s))
            step = steps["cpu"]
            row["split"] = profiled_split(step, args.profiled)
            row["python_hotspots"] = python_hotspots(step, args.profiled, args.hotspots)
            s = row["split"]
            print(f"{loss:>18} B={b:<5} cpu {row['cpu']['median_s'] * 1e3:.3f} ms, "
                  f"pml {row['pml']['median_s'] * 1e3:.3f} ms | profiled {s['profiled_step_us']:.0f} µs"
                  f" = op {s['op_us']:.0f} + glue ops {s['glue_ops_us']:.0f} ({s['glue_ops']:.0f})"
                  f" + outside ops {s['outside_ops_us']:.0f}", flush=True)
            rows.append(row)
    write_result(args.out, cpu, rows)


if __name__ == "__main__":
    main()
