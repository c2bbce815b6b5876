"""Builds the loss module a TrainConfig names, with its Metrix / EE options; proxy losses get
one proxy per training class."""
from __future__ import annotations

import inspect

from .. import losses
from ..config import Expansion, Metrix
from .config import TrainConfig


def build_loss(cfg: TrainConfig, num_classes: int, embedding_dim: int):
    cls = getattr(losses, cfg.loss)
    kwargs = dict(cfg.loss_kwargs)
    if "num_classes" in inspect.signature(cls.__init__).parameters or hasattr(cls, "init"):
        kwargs.setdefault("num_classes", num_classes)
        kwargs.setdefault("embedding_size", embedding_dim)
    if cfg.metrix is not None:
        kwargs["metrix"] = Metrix(level=cfg.metrix, pairs=cfg.metrix_pairs,
                                  alpha=cfg.metrix_alpha, weight=cfg.metrix_weight)
    if cfg.expansion:
        kwargs["expansion"] = Expansion(n_points=cfg.expansion, pairs=cfg.expansion_pairs)
    try:
        return cls(backend=cfg.backend, **kwargs)
    except TypeError as e:
        raise ValueError(f"--loss-kwargs {cfg.loss_kwargs} do not fit {cfg.loss}: {e}") from e
