"""Timing and memory harness shared by the benchmarks: median / p20 / p80 of repeated runs
(device-synchronised), peak memory (CUDA: max_memory_allocated; CPU: peak RSS growth of
this process, so run each case in its own process), and a JSON record with the machine."""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time

import torch


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device, warmup=2, repeats=10):
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    q = statistics.quantiles(times, n=5) if len(times) >= 5 else [times[0]] * 4
    return {"median_s": statistics.median(times), "p20_s": q[0], "p80_s": q[3], "repeats": repeats}


def peak_memory(fn, device):
    """Peak bytes allocated above the baseline while fn runs."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    fn()
    return max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)


def machine(device):
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
    else:
        info["device"] = platform.processor() or "cpu"
        # the fp32 kernels' SIMD level (METRIX_OPS_SIMD or the default): it moves CPU times
        try:
            import metrix_ops  # noqa: F401  (loads the extension)
            info["simd_level"] = torch.ops.metrix_ops._simd_level()
        except (ImportError, AttributeError, RuntimeError):
            pass
    return info


def write_result(path, device, rows):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    record = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
              "machine": machine(device), "results": rows}
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    return record
