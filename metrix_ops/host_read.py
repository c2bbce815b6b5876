"""Reading tensor data on the host, also inside a torch.func transform.

On torch 2.4 and 2.6 a read of tensor data inside a transform (`tolist()` of a wrapped
tensor, or of the tensor it wraps) raises "Cannot access data pointer of Tensor that doesn't
have storage"; torch 2.14 reads through the wrappers (the versions between were not tried).
The values the package reads (check results, sizes, counts) carry no gradient, so they are
read with the transforms' dispatch turned off, from the tensor under the wrappers."""
from __future__ import annotations

import torch

_functorch = torch._C._functorch


def unwrapped(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor under any torch.func wrappers (t itself outside a transform)."""
    while _functorch.is_functorch_wrapped_tensor(t):
        t = _functorch.get_unwrapped(t)
    return t


def host_list(t: torch.Tensor) -> list:
    """t.tolist(), inside a torch.func transform too."""
    if not torch._C._are_functorch_transforms_active():
        return t.tolist()
    with torch._C._DisableFuncTorch():
        return unwrapped(t).tolist()
