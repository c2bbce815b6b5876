"""Value checks of the losses' hyper-parameters, shared by every backend: a degenerate value
is one clear error here, where it was inf or NaN on one backend and a refusal on another
(MultiSimilarity's α = 0 divides by zero in PML's formula, a temperature of 0 makes every
logit infinite, an infinite triplet margin makes every loss infinite). A hyper-parameter
given as a tensor (learned) is not read: that would be a host sync per call."""
from __future__ import annotations

import math
import numbers

import torch

# (loss, hyper-parameter): the rule and its wording
_RULES = {
    ("MultiSimilarityLoss", "alpha"): (lambda v: v > 0, "finite and > 0 (PML divides by it)"),
    ("MultiSimilarityLoss", "beta"): (lambda v: v > 0, "finite and > 0 (PML divides by it)"),
    ("NTXentLoss", "temperature"): (lambda v: v > 0, "finite and > 0"),
    ("SupConLoss", "temperature"): (lambda v: v > 0, "finite and > 0"),
    ("TripletMarginLoss", "margin"): (lambda v: True, "finite"),
}


def check_hyper(name: str, params: dict) -> None:
    """Raises ValueError naming the hyper-parameter when its value breaks its rule or is not
    finite. Not under torch.compile: dynamo traces a float attribute as a symbolic input,
    which a Python test cannot read (the eager call checks it)."""
    if torch.compiler.is_compiling():
        return
    for (loss, key), (ok, wording) in _RULES.items():
        if loss != name or key not in params:
            continue
        v = params[key]
        if torch.is_tensor(v):
            continue
        if not isinstance(v, numbers.Real) or isinstance(v, bool):
            raise TypeError(f"{name}'s {key} must be a real number, got {type(v).__name__}")
        if not (math.isfinite(float(v)) and ok(float(v))):
            raise ValueError(f"{name}'s {key} must be {wording}, got {v!r}")
