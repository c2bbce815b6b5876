"""Baseline vs +Metrix vs +EE with the same seeds: mean ± std of the final metrics over
seeds, a JSON of every run, and a PNG of R@1 and loss curves."""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import sys
from typing import Dict, List, Optional

from ..reference.expansion import EXPANSION_LOSSES
from ..reference.metrix_soft_forms import SOFT_FORMS
from .config import TrainConfig
from .loop import load_split, train

REPORTED = ("precision_at_1", "recall_at_2", "recall_at_4", "recall_at_8", "r_precision",
            "mean_average_precision_at_r", "NMI", "utilization")


def variants(cfg: TrainConfig, metrix_level: str = "feature", ee_points: int = 8) -> List[TrainConfig]:
    """The baseline of `cfg`'s loss, + Metrix (cfg's level, else `metrix_level`) and + EE
    (cfg's n, else `ee_points`), each only where the loss supports it."""
    base = dataclasses.replace(cfg, metrix=None, expansion=0)
    out = [base]
    if cfg.loss in SOFT_FORMS:
        out.append(dataclasses.replace(base, metrix=cfg.metrix or metrix_level))
    if cfg.loss in EXPANSION_LOSSES:
        out.append(dataclasses.replace(base, expansion=cfg.expansion or ee_points))
    return out


def summarize(runs: List[dict]) -> Dict[str, Dict[str, float]]:
    """{metric: {"mean", "std"}} of the final evaluations (std 0 for one run)."""
    out = {}
    for key in REPORTED + ("seconds",):
        vals = [r["seconds"] if key == "seconds" else r["final"][key] for r in runs
                if key == "seconds" or key in r["final"]]
        if vals:
            out[key] = {"mean": statistics.fmean(vals),
                        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}
    return out


def plot(results: Dict[str, List[dict]], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, runs in results.items():
        epochs = [h["epoch"] for h in runs[0]["history"]]
        for ax, key in zip(axes, ("precision_at_1", "loss")):
            v = np.array([[np.nan if h[key] is None else h[key] for h in r["history"]]
                          for r in runs], dtype=float)
            m, s = v.mean(0), v.std(0)
            ax.plot(epochs, m, label=name)
            ax.fill_between(epochs, m - s, m + s, alpha=0.2)
    axes[0].set(xlabel="epoch", ylabel="R@1 (test classes)", title="Recall@1")
    axes[1].set(xlabel="epoch", ylabel="training loss", title="Loss (incl. Metrix/EE terms)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine() -> dict:
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}


def compare(cfg: TrainConfig, seeds: int = 3, out_dir: Optional[str] = "runs/compare",
            metrix_level: str = "feature", ee_points: int = 8, progress: bool = True) -> dict:
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    split = load_split(cfg)  # loaded once; every run starts from its own seed
    results: Dict[str, List[dict]] = {}
    for v in variants(cfg, metrix_level, ee_points):
        results[v.describe()] = [train(dataclasses.replace(v, seed=cfg.seed + s), split, progress)
                                 for s in range(seeds)]
    report = {"data": split.name, "seeds": [cfg.seed + s for s in range(seeds)],
              "machine": machine(), "command": " ".join(["python -m metrix_ops.train"] + sys.argv[1:]),
              "summary": {k: summarize(r) for k, r in results.items()}, "runs": results}
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "compare.json"), "w") as f:
            json.dump(report, f, indent=1)
        plot(results, os.path.join(out_dir, "compare.png"))
        report["files"] = [os.path.join(out_dir, n) for n in ("compare.json", "compare.png")]
    return report
