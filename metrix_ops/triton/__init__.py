"""The fused Triton engine (backend="triton"): flash-attention-style kernels that stream
similarity tiles by tl.dot, keep per-row statistics online, and accumulate gradients without
storing the B×M matrix. Each loss module holds its kernels, their launchers and the autograd
Function, and registers its loss with `metrix_ops.fused`."""
from __future__ import annotations

from .launch import HAS_TRITON, interpreting, usable_on  # noqa: F401

if HAS_TRITON:
    pass  # loss modules are imported here (they register themselves)
    from . import ntxent, proxy_anchor, proxy_nca  # noqa: F401
