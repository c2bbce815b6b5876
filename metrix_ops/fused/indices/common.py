"""What every loss over an indices_tuple needs: the distances of the listed pairs (the fused
pair_sims op: O(P), no B×M matrix, no P×D gather), PML's pair conventions on index vectors,
and per-anchor log-sum-exps over the pairs by scatter (O(P + B) memory)."""
from __future__ import annotations

import torch

from ...distances import CosineSimilarity, DotProductSimilarity, LpDistance, is_raw_l2
from ...ops.pair_sims import HAS_OP, pair_sims
from ...reference.pairs import to_pairs
from ...ops.unit_rows import normalized
from ..raw_l2 import l2_where, raw_l2_of_pairs, raw_on_cpu, raw_zero_eps

ZERO = {"losses": 0, "indices": None, "reduction_type": "already_reduced"}


def pair_kind(d):
    """'sim' for a similarity of the rows as the distance normalises them (Cosine /
    DotProduct, power 1: any p, or none): s = x̂·r̂ exactly; 'l2' for the L2 distance of unit
    rows (LpDistance, normalised, p=2, power 1 or 2): a function of s; 'raw' for the L2 of
    unnormalised rows, read off s and the rows' squared norms (raw_l2.raw_l2_of_pairs); None
    otherwise (the reference: a non-Euclidean distance is not a function of one product)."""
    if type(d) in (CosineSimilarity, DotProductSimilarity) and d.power == 1:
        return "sim"
    if type(d) is LpDistance and d.normalize_embeddings and d.p == 2 and d.power in (1, 2):
        return "l2"
    return "raw" if is_raw_l2(d) else None


def covers(inp, expansion) -> bool:
    """The shared scope of the indices_tuple ops: a tuple, no expansion, a covered distance
    (raw L2 on CPU tensors: the CUDA engine shares this glue, and has not run raw rows)."""
    kind = pair_kind(inp.distance)
    return (HAS_OP and expansion is None and inp.indices_tuple is not None
            and kind is not None and (kind != "raw" or raw_on_cpu(inp)))


def unit_l2_from_sims(s, power):
    """‖x̂ − r̂‖ (power 1) or its square (power 2) from s = x̂·r̂, as common/contrastive.h's
    unit_l2_from_sim: 2 − 2s below a few ulps is rounding noise of duplicate rows and is taken
    as exactly 0, with a zero gradient there as torch.cdist's backward (never √0's inf)."""
    q = 2 - 2 * s
    return l2_where(q, q > 8 * torch.finfo(s.dtype).eps, power)


class ListedPairs:
    """The call's distance on listed pairs: rows index the batch, cols the references."""

    def __init__(self, inp):
        d = inp.distance
        self.distance, self.kind = d, pair_kind(d)
        if self.kind == "raw":  # the rows as they are, and their squared norms
            x, ref = inp.embeddings, inp.ref_emb
            self.xu, self.ru = x, ref
            self.sqx = x.square().sum(1)
            self.sqr = self.sqx if ref is x else ref.square().sum(1)
            self.eps = raw_zero_eps(x)
            return
        # normalisation and its gradient stay in PyTorch (O((B+M)·D)); the batch against
        # itself is normalised once, so both ends of a pair share one graph node
        self.xu = normalized(d, inp.embeddings)
        self.ru = self.xu if inp.ref_emb is inp.embeddings else normalized(d, inp.ref_emb)

    def of(self, rows, cols, refs_both: bool = False):
        """Distances of the pairs (rows_k, cols_k); refs_both: both ends index the references."""
        left = self.ru if refs_both else self.xu
        s = pair_sims(left, self.ru, rows, cols)
        if self.kind == "raw":
            sq_left = self.sqr if refs_both else self.sqx
            return raw_l2_of_pairs(s, sq_left[rows], self.sqr[cols], self.distance.power,
                                   self.eps)
        return s if self.kind == "sim" else unit_l2_from_sims(s, self.distance.power)

    def of_lists(self, *pairs):
        """Distances of several (rows, cols) lists from one op call, split back per list."""
        rows = torch.cat([r for r, _ in pairs])
        cols = torch.cat([c for _, c in pairs])
        return torch.split(self.of(rows, cols), [len(r) for r, _ in pairs])


def long_pairs(inp):
    """(a1, p, a2, n) as int64 (PML's convert_to_pairs: a triplet tuple gives (a, p, a, n))."""
    return tuple(t.long() for t in to_pairs(inp.indices_tuple, inp.labels, inp.ref_labels,
                                           inp.same_set))


def unique_pairs(rows, cols, m: int):
    """The distinct pairs of a list: the reference builds a B×M mask from it, so a pair listed
    twice counts once. Sorted by (row, col)."""
    key = torch.unique(rows * m + cols)
    return key // m, key % m


def anchor_max(z, rows, n: int):
    """(max of z over each anchor's pairs, detached; 0 where none) and the anchors' has-pair
    mask: the shift of a per-anchor log-sum-exp."""
    has = torch.bincount(rows, minlength=n) > 0
    m = z.new_full((n,), float("-inf")).scatter_reduce(0, rows, z.detach(), "amax")
    return torch.where(has, m, torch.zeros_like(m)), has


def anchor_lse(z, rows, n: int, add_one: bool):
    """log(Σ_{k: rows_k = i} e^{z_k} [+ 1]) for each anchor i < n, 0 for an anchor with no
    pair: reference.lse.masked_logsumexp over the listed pairs (a mask: list them once)."""
    m, has = anchor_max(z, rows, n)
    if add_one:
        m = torch.clamp(m, min=0)  # the e^0 term enters the max
    total = z.new_zeros(n).index_add(0, rows, torch.exp(z - m[rows]))
    if add_one:
        total = total + torch.exp(-m)
    safe = torch.where(has, total, torch.ones_like(total))
    return torch.where(has, m + torch.log(safe), torch.zeros_like(m))
