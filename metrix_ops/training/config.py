"""Every setting of a training run in one dataclass, checked when it is built so that a bad
option fails before any data is loaded, with the command-line option's name."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from ..config import EXPANSION_PAIRS, METRIX_LEVELS, METRIX_PAIRS


def loss_names():
    from .. import losses
    from ..losses.base import BaseMetricLoss

    return sorted(n for n in losses.__all__ if isinstance(getattr(losses, n), type)
                  and issubclass(getattr(losses, n), BaseMetricLoss)
                  and getattr(losses, n) is not BaseMetricLoss and not n.endswith("Base"))


@dataclass
class TrainConfig:
    loss: str = "MultiSimilarityLoss"
    loss_kwargs: dict = field(default_factory=dict)  # constructor arguments, as PML's
    metrix: Optional[str] = None                     # level: embedding | feature | input
    metrix_pairs: str = "pos_neg"
    metrix_alpha: float = 2.0
    metrix_weight: float = 0.4
    expansion: int = 0                               # EE synthetic points per positive pair
    expansion_pairs: str = "all"
    backend: str = "auto"
    epochs: int = 20
    classes_per_batch: int = 5
    samples_per_class: int = 16
    embedding_dim: int = 8
    lr: float = 1e-3
    loss_lr: float = 1e-1   # proxies learn faster than the network (ProxyAnchor paper: ×100)
    weight_decay: float = 1e-4
    seed: int = 0
    device: str = "cpu"
    data: Optional[str] = None   # None: scikit-learn digits; else ROOT/<class>/<image>
    image_size: int = 224
    backbone: str = "small_cnn"
    pretrained: bool = False
    workers: int = 0
    eval_every: int = 1
    amp: bool = False   # bf16 autocast for the training step (the losses compute in fp32)
    save_model: Optional[str] = None   # a file for the trained network (models.load_trained)
    ddp_efficient: bool = False   # under torchrun: DistributedLossWrapper(efficient=True)

    def __post_init__(self):
        names = loss_names()
        if self.loss not in names:
            raise ValueError(f"--loss must be one of {', '.join(names)}; got {self.loss!r}")
        if self.metrix is not None and self.metrix not in METRIX_LEVELS:
            raise ValueError(f"--metrix must be one of {METRIX_LEVELS}, got {self.metrix!r}")
        if self.metrix_pairs not in METRIX_PAIRS:
            raise ValueError(f"--metrix-pairs must be one of {METRIX_PAIRS}, got {self.metrix_pairs!r}")
        if self.expansion_pairs not in EXPANSION_PAIRS:
            raise ValueError(f"--expansion-pairs must be one of {EXPANSION_PAIRS}, got "
                             f"{self.expansion_pairs!r}")
        if self.metrix is not None:
            from ..reference.metrix_soft_forms import SOFT_FORMS
            if self.loss not in SOFT_FORMS:
                raise ValueError(f"--metrix is implemented for {', '.join(sorted(SOFT_FORMS))}; "
                                 f"not for --loss {self.loss}")
        if self.expansion:
            from ..reference.expansion import EXPANSION_LOSSES
            if self.loss not in EXPANSION_LOSSES:
                raise ValueError(f"--expansion is implemented for {', '.join(sorted(EXPANSION_LOSSES))}; "
                                 f"not for --loss {self.loss}")
            if self.expansion_pairs == "adjacent" and self.samples_per_class % 2:
                raise ValueError("--expansion-pairs adjacent pairs rows 2t, 2t+1 of one class: "
                                 f"--samples-per-class must be even, got {self.samples_per_class}")
        for name in ("epochs", "classes_per_batch", "samples_per_class", "embedding_dim",
                     "image_size", "eval_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.expansion < 0 or self.workers < 0:
            raise ValueError("--expansion and --workers must be >= 0")
        for name in ("lr", "loss_lr"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.weight_decay < 0:
            raise ValueError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not 0.0 < self.metrix_alpha or not 0.0 <= self.metrix_weight:
            raise ValueError("--metrix-alpha must be > 0 and --metrix-weight >= 0")
        if self.ddp_efficient and (self.expansion or self.metrix in ("feature", "input")):
            raise ValueError("--ddp-efficient takes neither --expansion (EE mines the batch's "
                             "own positive pairs) nor --metrix feature/input (each rank's loss "
                             "is its own there)")
        if not isinstance(self.loss_kwargs, dict):
            raise ValueError("--loss-kwargs must be a JSON object, e.g. '{\"margin\": 0.2}'")

    def describe(self) -> str:
        """A short name for tables and plots: MultiSimilarityLoss+Metrix(feature)+EE(8)."""
        name = self.loss
        if self.metrix:
            name += f"+Metrix({self.metrix})"
        if self.expansion:
            name += f"+EE({self.expansion})"
        return name

    def to_dict(self) -> dict:
        return asdict(self)
