"""Version numbers as comparable tuples, for the places that depend on the installed torch or
triton (the Triton engine's minimum, torch 2.4's gloo teardown)."""
from __future__ import annotations

import re

import torch


def version_tuple(version: str) -> tuple:
    """'3.2.0+git…' -> (3, 2); (0, 0) for a version that does not start with two numbers."""
    found = re.match(r"(\d+)\.(\d+)", version)
    return (int(found[1]), int(found[2])) if found else (0, 0)


TORCH_VERSION = version_tuple(torch.__version__)
