"""backend="cuda": MultiSimilarityLoss with its embedding-level Metrix term (pairs "pos_neg"
or "anchor_neg", the batch against itself): the clean loss from the CUDA engine's MS op, the
mixed term ℓ̃(a) from csrc/cuda/ms_metrix_cuda.cu on the label-sorted batch (chunks of whole
classes, candidates in closed form; no class-size limit). Fake kernels for torch.compile and
autograd for the op are here; CUDA builds only."""
from __future__ import annotations

import torch

from .. import _ext
from ..ops.ms_loss import ms_loss_rows
from ..ops.ms_metrix import label_sorted
from ..ops.unit_rows import unit_rows
from . import register_metrix
from .multi_similarity import _reduce_clean, self_pairs, supports as clean_supports

_FWD = "metrix_ops::ms_metrix_mix_fwd"
HAS_OP = _ext.HAS_CUDA_EXT and hasattr(torch.ops.metrix_ops, "ms_metrix_mix_fwd")
CHUNK = 1024  # rows of whole classes per product S_rows = X_rows Xᵀ (tests set it small)

if HAS_OP:
    @torch.library.register_fake(_FWD)
    def _fake(x, labels, class_start, class_size, alpha, beta, base, lam, anchor_neg, chunk):
        return tuple(x.new_empty(x.shape[0]) for _ in range(3))

    @torch.library.register_fake("metrix_ops::ms_metrix_mix_bwd")
    def _fake_bwd(grad, x, labels, class_start, class_size, lse_pos, lse_neg, alpha, beta, base,
                  lam, anchor_neg, chunk):
        return torch.empty_like(x)

    def _setup_context(ctx, inputs, output):
        x, labels, class_start, class_size, *consts = inputs
        ctx.save_for_backward(x, labels, class_start, class_size, output[1], output[2])
        ctx.consts = tuple(consts)
        ctx.mark_non_differentiable(output[1], output[2])

    def _backward(ctx, g_mix, _g_lp, _g_ln):
        dx = torch.ops.metrix_ops.ms_metrix_mix_bwd(g_mix.contiguous(), *ctx.saved_tensors,
                                                    *ctx.consts)
        return (dx,) + (None,) * 9

    torch.library.register_autograd(_FWD, _backward, setup_context=_setup_context)


def class_layout(sorted_labels):
    """Each row's class start and size in a label-sorted batch (int64)."""
    _, inverse, sizes = torch.unique_consecutive(sorted_labels, return_inverse=True,
                                                 return_counts=True)
    return (torch.cumsum(sizes, 0) - sizes)[inverse], sizes[inverse]


def ms_metrix_rows_cuda(x_unit, labels, alpha: float, beta: float, base: float, lam: float,
                        pairs: str = "pos_neg", chunk: int | None = None):
    """ℓ̃(a) for each anchor (B,), in the caller's order, of unit rows x_unit against
    themselves (0 where V(a) is empty); differentiable in x_unit."""
    if pairs not in ("pos_neg", "anchor_neg"):
        raise ValueError(f"pairs must be 'pos_neg' or 'anchor_neg', got {pairs!r}")
    xs, ys, inverse = label_sorted(x_unit, labels.long())
    start, size = class_layout(ys)
    mix, _, _ = torch.ops.metrix_ops.ms_metrix_mix_fwd(
        xs, ys, start, size, float(alpha), float(beta), float(base), float(lam),
        pairs == "anchor_neg", int(chunk or CHUNK))
    return mix.index_select(0, inverse)


def metrix_supports(params, inp, expansion, metrix) -> bool:
    return (HAS_OP and inp.embeddings.device.type == "cuda"
            and clean_supports(params, inp, expansion) and metrix.level == "embedding"
            and metrix.pairs in ("pos_neg", "anchor_neg") and self_pairs(inp))


def metrix_impl(params, inp, reducer, metrix, lam: float):
    """L(clean) + weight · L̃, L̃ the mean of ℓ̃(a) over the anchors with a candidate (with one
    class every ℓ̃(a) is 0, so the sum over B is that mean), as the other engines' glue."""
    xu = unit_rows(inp.embeddings)
    a, b, base = params["alpha"], params["beta"], params["base"]
    rows = ms_loss_rows(xu, xu, inp.labels, inp.labels, True, a, b, base)
    mix = ms_metrix_rows_cuda(xu, inp.labels, a, b, base, lam, metrix.pairs)
    return _reduce_clean(rows, inp, reducer) + metrix.weight * (mix.sum() / max(len(mix), 1))


register_metrix("cuda", "MultiSimilarityLoss", metrix_supports, metrix_impl)
