"""The fused Triton engine (backend="triton"): flash-attention-style kernels that stream
similarity tiles by tl.dot, keep per-row statistics online, and accumulate gradients without
storing the B×M matrix. Each loss module holds its kernels, their launchers and the autograd
Function, and registers its loss with `metrix_ops.fused`."""
from __future__ import annotations

from .launch import HAS_TRITON, interpreting, usable_on  # noqa: F401

if HAS_TRITON:
    # loss modules are imported here (they register themselves)
    from . import multi_similarity  # noqa: F401
    from . import contrastive  # noqa: F401
    from . import triplet_margin  # noqa: F401
    from . import hphn_triplet  # noqa: F401
    from . import ntxent, proxy_anchor, proxy_nca  # noqa: F401
    from . import circle, ms_metrix, contrastive_metrix, circle_metrix, ee_hphn  # noqa: F401
    from . import generalized_lifted, lifted_structure, npairs  # noqa: F401
    from . import generalized_lifted_metrix, ms_mined, pair_sims, triplet_miners  # noqa: F401
    from . import proxy_anchor_metrix, proxy_nca_metrix  # noqa: F401
    from . import ee_losses  # noqa: F401
