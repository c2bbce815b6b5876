"""The reference training run (also the console script `metrix-train`):

    python -m metrix_ops.train                          # MS loss on digits, a few minutes on 2 cores
    python -m metrix_ops.train --metrix feature         # + Metrix on the last conv block's output
    python -m metrix_ops.train --expansion 8            # + Embedding Expansion
    python -m metrix_ops.train --compare --seeds 3      # baseline vs +Metrix vs +EE, JSON + PNG
    python -m metrix_ops.train --data CUB_200_2011/images --backbone resnet50 --pretrained
    torchrun --nproc_per_node=8 -m metrix_ops.train --device cuda --data ...   # DDP, 8 GPUs

Default data: scikit-learn's bundled digits as a zero-shot split (train on classes 0–4,
retrieve among 5–9). `--data ROOT` takes ROOT/<class>/<image>; the first half of the
classes (sorted) train, the rest test.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from .config import EXPANSION_PAIRS, METRIX_LEVELS, METRIX_PAIRS
from .training.compare import REPORTED, compare, summarize
from .training.config import TrainConfig, loss_names
from .training.distributed import teardown
from .training.loop import train

_SHORT = {"precision_at_1": "R@1", "recall_at_2": "R@2", "recall_at_4": "R@4",
          "recall_at_8": "R@8", "r_precision": "RP", "mean_average_precision_at_r": "MAP@R",
          "NMI": "NMI", "utilization": "util", "seconds": "time (s)"}


def parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="metrix-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--loss", default=d.loss, help=f"one of: {', '.join(loss_names())}")
    a("--loss-kwargs", default="{}", help="JSON of the loss's constructor arguments (PML's names)")
    a("--metrix", choices=METRIX_LEVELS, default=None, help="Metrix level (default: off)")
    a("--metrix-pairs", choices=METRIX_PAIRS, default=d.metrix_pairs)
    a("--metrix-alpha", type=float, default=d.metrix_alpha, help="λ ~ Beta(α, α)")
    a("--metrix-weight", type=float, default=d.metrix_weight, help="w in L + w·L_mixed")
    a("--expansion", type=int, default=0, metavar="N", help="EE synthetic points per pair (0: off)")
    a("--expansion-pairs", choices=EXPANSION_PAIRS, default=d.expansion_pairs)
    a("--backend", default=d.backend, choices=("auto", "reference", "cpu", "cuda", "triton"))
    a("--epochs", type=int, default=d.epochs)
    a("--classes-per-batch", type=int, default=d.classes_per_batch)
    a("--samples-per-class", type=int, default=d.samples_per_class)
    a("--embedding-dim", type=int, default=d.embedding_dim)
    a("--lr", type=float, default=d.lr)
    a("--loss-lr", type=float, default=d.loss_lr, help="learning rate of loss parameters (proxies)")
    a("--weight-decay", type=float, default=d.weight_decay)
    a("--seed", type=int, default=d.seed)
    a("--device", default=d.device)
    a("--data", default=None, help="ROOT/<class>/<image> folder (default: built-in digits)")
    a("--image-size", type=int, default=d.image_size, help="for --data")
    a("--backbone", default=d.backbone, help="small_cnn, resnet18/34/50/... (torchvision), timm:NAME")
    a("--pretrained", action="store_true", help="ImageNet weights for the backbone")
    a("--amp", action="store_true",
      help="bf16 autocast for the training step's forward (the losses compute in fp32 from "
           "the bf16 embeddings; evaluation in fp32)")
    a("--ddp-efficient", action="store_true",
      help="under torchrun: each rank's own anchors against all ranks' embeddings "
           "(DistributedLossWrapper(efficient=True), PML's cheaper form), not the whole "
           "gathered batch's loss on every rank")
    a("--save-model", default=None, metavar="PATH",
      help="write the trained network here (metrix_ops.training.models.load_trained reads it)")
    a("--workers", type=int, default=d.workers, help="data loader worker processes")
    a("--eval-every", type=int, default=d.eval_every, help="evaluate every N epochs")
    a("--compare", action="store_true", help="run baseline, +Metrix and +EE over --seeds seeds")
    a("--seeds", type=int, default=3, help="seeds for --compare (seed, seed+1, ...)")
    a("--out", default="runs", help="folder for the JSON (and --compare's PNG)")
    a("--quiet", action="store_true", help="no progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    try:
        loss_kwargs = json.loads(args.loss_kwargs)
    except json.JSONDecodeError as e:
        raise ValueError(f"--loss-kwargs is not valid JSON ({e}): {args.loss_kwargs!r}") from e
    fields = {k: getattr(args, k) for k in TrainConfig.__dataclass_fields__ if k != "loss_kwargs"}
    return TrainConfig(loss_kwargs=loss_kwargs, **fields)


def table(summary: dict) -> str:
    """Rows: runs; columns: the final metrics as mean ± std (one run: just the value)."""
    keys = [k for k in REPORTED + ("seconds",) if any(k in s for s in summary.values())]
    rows = [["run"] + [_SHORT[k] for k in keys]]
    for name, s in summary.items():
        rows.append([name] + [(f"{s[k]['mean']:.4f}" + (f" ± {s[k]['std']:.4f}" if s[k]["std"] else ""))
                              if k in s else "-" for k in keys])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join([lines[0], "-" * len(lines[0])] + lines[1:])


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        if args.compare and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("--compare runs in one process, not under torchrun")
        if args.compare:
            report = compare(cfg, seeds=args.seeds, out_dir=args.out, progress=not args.quiet)
            summary = report["summary"]
        else:
            result = train(cfg, progress=not args.quiet)
            teardown()
            if "history" not in result:  # a torchrun rank other than 0: rank 0 reports
                return 0
            summary = {cfg.describe(): summarize([result])}
            if args.out:
                os.makedirs(args.out, exist_ok=True)
                path = os.path.join(args.out, f"{cfg.describe()}-seed{cfg.seed}.json")
                with open(path, "w") as f:
                    json.dump(result, f, indent=1)
                report = {"files": [path]}
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"metrix-train: error: {e}", file=sys.stderr)
        return 2
    data = cfg.data or "digits (scikit-learn; train classes 0-4, test 5-9)"
    ranks = result.get("world_size", 1) if not args.compare else 1
    on = f", {ranks} processes" if ranks > 1 else ""
    print(f"\nzero-shot retrieval on {data}, {cfg.epochs} epochs{on}, final evaluation:")
    print(table(summary))
    for path in report.get("files", []):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
