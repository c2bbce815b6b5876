"""Row blocks of a miner's B×M distance matrix, each holding exactly the values the full
call `distance(x, ref)` would (so streaming miners keep the reference's ties and
boundaries), with O(rows · M) memory. The full matrix is never formed."""
from __future__ import annotations

import torch

from ..distances import (BaseDistance, CosineSimilarity, DotProductSimilarity, LpDistance,
                         cdist_is_direct)

# entries of one block (rows × M): 8 MiB in fp32, whatever B. Each block pays a pass over
# the whole reference side (cdist re-forms its padded B×(D+2) copy and norms per call), so
# small blocks spend their time there: TripletMarginLoss + BatchHardMiner at B = 4096,
# D = 512 took 204 ms with 2^18 entries (64-row blocks), 112 ms with 2^21 (2-core VM)
BLOCK_ENTRIES = 1 << 21


def block_rows(m: int, entries: int = BLOCK_ENTRIES) -> int:
    """Rows per block for M columns: entries // M, at least one."""
    return max(1, entries // max(m, 1))


def _block(distance: BaseDistance, q, r, use_mm: bool):
    if isinstance(distance, LpDistance) and distance.p == 2:
        # cdist picks its matmul form from the sizes of the whole call (either side > 25
        # rows); a block has fewer rows, so the full call's choice is forced, or the values
        # (and the ties the miners break) would differ from the dense matrix's in rounding
        half = q.dtype in (torch.float16, torch.bfloat16)
        mode = "use_mm_for_euclid_dist" if use_mm else "donot_use_mm_for_euclid_dist"
        mat = torch.cdist(q.float() if half else q, r.float() if half else r, p=2.0,
                          compute_mode=mode)
        mat = mat.to(q.dtype) if half else mat
    else:
        mat = distance.compute_mat(q, r)
    return mat**distance.power if distance.power != 1 else mat


def distance_row_blocks(distance: BaseDistance, x, ref, rows: int):
    """Yields (start, block) with block == distance(x, ref)[start:start + rows]."""
    q = distance.maybe_normalize(x)
    r = q if ref is x else distance.maybe_normalize(ref)
    use_mm = not cdist_is_direct(len(q), len(r))
    for start in range(0, len(q), rows):
        yield start, _block(distance, q[start:start + rows], r, use_mm)


def same_distance(a: BaseDistance, b: BaseDistance) -> bool:
    """Whether two distance objects compute the same matrix (one pass serves both)."""
    # settings decide only for our own classes: a subclass may hold more state
    return a is b or (type(a) is type(b) and type(a) in (LpDistance, CosineSimilarity,
                                                         DotProductSimilarity)
                      and a.settings() == b.settings())


def block_diagonal(start: int, n_rows: int, m: int, device):
    """(row, col) of the self pairs (i, i) inside the block of rows [start, start + n_rows)."""
    i = torch.arange(n_rows, device=device)
    keep = start + i < m
    return i[keep], (start + i)[keep]
