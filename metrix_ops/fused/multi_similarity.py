"""MultiSimilarityLoss through the fused streaming op: the loss's per-anchor terms come
from ms_loss_fwd (no B×M matrix); PML's reducers then apply to them as usual."""
from __future__ import annotations

import torch

from .. import _ext
from ..distances import CosineSimilarity, as_distance, is_cosine
from ..ops.ms_loss import ms_loss_rows, ms_loss_rows_self, ms_mined_rows, ms_mined_rows_self
from ..ops.ms_metrix import ms_metrix_refs_rows, ms_metrix_rows
from ..reference.metrix_soft_forms import combine_parts
from ..miners.base import record_counts
from ..reducers import reduce_loss_dict
from ..ops.unit_rows import unit_rows
from . import register, register_metrix, register_miner
from .metrix_refs import with_negatives
from .pair_counts import pair_count_tensors


def supports(params, inp, expansion) -> bool:
    return (_ext.HAS_EXT and expansion is None and inp.indices_tuple is None
            and is_cosine(inp.distance) and inp.labels is not None)


def self_pairs(inp) -> bool:
    # the batch against itself, self pairs excluded (PML keeps them when ref_labels is another
    # tensor, even with ref_emb the batch): S is symmetric
    return inp.ref_emb is inp.embeddings and inp.same_set


# rows and columns of a tile of S in the CUDA engine's self ops (one 64 MiB fp32 tile; the CPU
# ops take their own blocks): tests set it small
CUDA_SELF_BLOCK = 4096
# False: the CUDA engine takes the general ops with r = x for the batch against itself too
# (benchmarks/bench_losses.py's impl "cuda-general" measures the two against each other)
CUDA_SELF_OPS = True


# the self ops with a CUDA kernel in this build, read once: a dispatcher query inside a loss call
# would break torch.compile's graph there
_CUDA_SELF_OPS = frozenset(op for op in ("ms_loss_self_fwd", "ms_mined_self_fwd",
                                         "contrastive_self_fwd", "circle_self_fwd",
                                         "gen_lifted_self_fwd", "supcon_self_fwd",
                                         "ntxent_self_fwd")
                           if _ext.has_cuda_kernel(op))


def _self_pairs_only(inp, op: str | None = None) -> bool:
    """self_pairs, on an engine with the symmetric self op: the CPU, or a CUDA device where
    metrix_ops::`op` (the loss's *_self_fwd) has a CUDA kernel (csrc/cuda: MS, MS with its
    miner, Contrastive, Circle, GeneralizedLifted, SupCon, NTXent). Elsewhere (LiftedStructure)
    the CUDA engine runs the general op with r = x; the Triton glue asks self_pairs itself."""
    if not self_pairs(inp):
        return False
    device = inp.embeddings.device.type
    return device == "cpu" or (device == "cuda" and CUDA_SELF_OPS and op in _CUDA_SELF_OPS)


def self_block(inp, cpu_block: int) -> int:
    """The self op's block: `cpu_block` on the CPU, CUDA_SELF_BLOCK on a GPU."""
    return cpu_block if inp.embeddings.device.type == "cpu" else CUDA_SELF_BLOCK


def _reduce_clean(rows, inp, reducer, counts=None):
    """PML's reduction of the per-anchor terms, with its rule: no loss when no side has two
    pairs (`counts`: the (positive, negative) pair totals, default all pairs of the call).
    A select on the counts, never a Python branch: a read of them is a host sync on a GPU
    (after the op is queued it would wait for the whole forward), and the graph has no
    data-dependent branch under torch.compile. The op runs on a batch without pairs too: its
    rows are finite there, and the select gives them no gradient."""
    x = inp.embeddings
    loss_dict = {"loss": {"losses": rows, "indices": torch.arange(len(rows), device=x.device),
                          "reduction_type": "element"}}
    loss = reduce_loss_dict(loss_dict, reducer, x)
    if counts is None:
        counts = pair_count_tensors(inp.labels, inp.ref_labels, inp.same_set)
    pos, neg = counts
    # a select (not zero_unless): a MeanReducer's mean over no rows (an empty batch against
    # a bank) is NaN, which the zero replaces. A scalar zero, not sum(x * 0): `loss` is in the
    # graph of x already (through the op's rows), and the select passes it a zero gradient
    return torch.where((pos <= 1) & (neg <= 1), 0.0, loss)


def impl(params, inp, reducer, chunk: int = 2048):
    x = inp.embeddings
    xu = unit_rows(x)
    if _self_pairs_only(inp, "ms_loss_self_fwd"):
        rows = ms_loss_rows_self(xu, inp.labels, params["alpha"], params["beta"], params["base"],
                                 self_block(inp, 1024))
    else:
        rows = ms_loss_rows(xu, unit_rows(inp.ref_emb), inp.labels, inp.ref_labels,
                            inp.same_set, params["alpha"], params["beta"], params["base"], chunk)
    return _reduce_clean(rows, inp, reducer)


def metrix_supports(params, inp, expansion, metrix) -> bool:
    """The fused clean + Metrix ops: embedding level, pos_neg or anchor_neg pairs, the batch
    against itself or against references (`ref_emb`), CPU tensors."""
    return (supports(params, inp, expansion) and metrix.level == "embedding"
            and metrix.pairs in ("pos_neg", "anchor_neg")
            and inp.embeddings.device.type == "cpu")


def metrix_impl(params, inp, reducer, metrix, lam: float, block: int = 1024):
    """L(clean) + weight · L̃: the mixed term is the mean of ℓ̃(a) over anchors with a
    candidate, i.e. with a negative. In the batch: with two classes or more that is every
    anchor, and with one class every ℓ̃(a) is 0, so the sum over B is that mean either way.
    Against references: the anchors with a negative among them."""
    xu = unit_rows(inp.embeddings)
    hyper = (params["alpha"], params["beta"], params["base"], lam, metrix.pairs)
    refs = metrix_refs_args(inp, xu)
    if refs is None:
        rows, mix = ms_metrix_rows(xu, inp.labels, *hyper, block)
        mixed = mix.sum() / max(len(mix), 1)
    else:
        ru, ref_labels, own = refs
        rows, mix = ms_metrix_refs_rows(xu, ru, inp.labels, ref_labels, own, *hyper)
        mixed = combine_parts([(mix.sum(), with_negatives(inp.labels, ref_labels))], xu)
    return _reduce_clean(rows, inp, reducer) + metrix.weight * mixed


def metrix_refs_args(inp, xu):
    """(unit references, their labels, each anchor's own row of them or −1) for the CPU
    Metrix ops against references; None for the batch against itself, which has its own ops
    (metrix_blocks.h). xu: the unit anchors."""
    if _self_pairs_only(inp):
        return None
    x = inp.embeddings
    ru = xu if inp.ref_emb is x else unit_rows(inp.ref_emb)
    own = (torch.arange(len(x)) if inp.same_set
           else torch.full((len(x),), -1, dtype=torch.long))
    return ru, inp.ref_labels, own


def miner_fits(inp, miner) -> bool:
    """MultiSimilarityMiner (ours or PML's) with a cosine similarity, which an engine's MS op
    can run inside. Not the calls where PML's miner and loss disagree on the self pair
    (ref_emb is the batch but ref_labels another tensor, or the reverse): those take the
    miner's index tuple."""
    if type(miner).__name__ != "MultiSimilarityMiner" or not hasattr(miner, "epsilon"):
        return False
    try:
        cosine = is_cosine(as_distance(getattr(miner, "distance", None), CosineSimilarity))
    except (TypeError, ValueError):  # a distance we do not know
        return False
    return cosine and (inp.ref_emb is inp.embeddings) == inp.same_set


def miner_supports(params, inp, miner) -> bool:
    return supports(params, inp, None) and miner_fits(inp, miner)


def mined_loss(params, inp, reducer, miner, rows_fn):
    """The loss over the pairs MultiSimilarityMiner(ε) keeps, from an engine's
    rows_fn(x_unit, r_unit, labels, ref_labels, exclude_diag, alpha, beta, base, eps) ->
    (per-anchor terms, kept pairs B×2): PML's reduction and its no-pairs rule on the kept
    pairs' totals."""
    x = inp.embeddings
    xu = unit_rows(x)
    ref = xu if inp.ref_emb is x else unit_rows(inp.ref_emb)
    rows, kept = rows_fn(xu, ref, inp.labels, inp.ref_labels, inp.same_set, params["alpha"],
                         params["beta"], params["base"], float(miner.epsilon))
    totals = kept.sum(0)
    record_counts(miner, pos_pairs=totals[0], neg_pairs=totals[1])
    return _reduce_clean(rows, inp, reducer, (totals[0], totals[1]))


MINED_SELF_BLOCK = 1024  # rows per block of the mined batch against itself (tests set it)


def miner_impl(params, inp, reducer, miner, chunk: int = 2048):
    """Each anchor's hardest positive and negative in one streaming pass, then the loss over
    the kept pairs in the next; the batch against itself over the symmetric blocks of S."""
    def rows(xu, ru, labels, ref_labels, same_set, alpha, beta, base, eps):
        if _self_pairs_only(inp, "ms_mined_self_fwd"):
            return ms_mined_rows_self(xu, labels, alpha, beta, base, eps,
                                      self_block(inp, MINED_SELF_BLOCK))
        return ms_mined_rows(xu, ru, labels, ref_labels, same_set, alpha, beta, base, eps,
                             chunk)
    return mined_loss(params, inp, reducer, miner, rows)


register("cpu", "MultiSimilarityLoss", supports, impl)
register_miner("cpu", "MultiSimilarityLoss", miner_supports, miner_impl)
register_metrix("cpu", "MultiSimilarityLoss", metrix_supports, metrix_impl)
