"""The loss registry: one `LossSpec` per loss class name.

A reference loss is a function `f(inp: LossInputs, **params) -> loss dict` registered with
`@register_loss(...)`. Modules (losses/), functions (functional/) and the fused backends
all look the loss up here by its PML class name, so the three never disagree on defaults.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .distances import BaseDistance


@dataclass
class LossInputs:
    """The PML call, after validation and PML's `set_ref_emb`."""

    embeddings: torch.Tensor
    labels: Optional[torch.Tensor]
    indices_tuple: Optional[tuple]
    ref_emb: torch.Tensor  # the batch itself when the caller gave none
    ref_labels: Optional[torch.Tensor]
    same_set: bool  # True when references are the batch: self pairs are excluded
    distance: BaseDistance

    def with_indices(self, indices_tuple) -> "LossInputs":
        """The same call with another indices_tuple (a miner's, or None). Built field by field:
        torch 2.6's dynamo cannot trace dataclasses.replace (its is-a-dataclass check)."""
        return LossInputs(self.embeddings, self.labels, indices_tuple, self.ref_emb,
                          self.ref_labels, self.same_set, self.distance)


@dataclass(frozen=True)
class LossSpec:
    name: str
    loss_dict: Callable  # reference: (LossInputs, **params) -> loss dict
    default_distance: Callable[[], BaseDistance]
    default_reducer: Callable
    labels_required: bool = True
    supports_ref_emb: bool = True
    supports_indices_tuple: bool = True
    sub_losses: tuple = ("loss",)  # PML's sub_loss_names(): the loss dict's keys


SPECS: dict[str, LossSpec] = {}


def register_loss(name, default_distance, default_reducer, **flags):
    def deco(fn):
        SPECS[name] = LossSpec(name, fn, default_distance, default_reducer, **flags)
        return fn
    return deco


def get_spec(name: str) -> LossSpec:
    if name not in SPECS:
        raise KeyError(f"unknown loss {name!r}; known: {sorted(SPECS)}")
    return SPECS[name]
