"""backend="cuda": MultiSimilarityLoss, ContrastiveLoss, CircleLoss and
GeneralizedLiftedStructureLoss with their embedding-level Metrix term (pairs "pos_neg" or
"anchor_neg", the batch against itself): the clean loss from the CUDA engine's op, the mixed
term from csrc/cuda/ms_metrix_cuda.cu, contrastive_metrix_cuda.cu or lse_metrix_cuda.cu (the
engine cuda/metrix_rows.cuh) on the label-sorted batch (chunks of whole classes, candidates
in closed form; no class-size limit), finished in PyTorch as the CPU glue finishes its ops'
outputs. Fake kernels for torch.compile and autograd for the ops are here; CUDA builds
only."""
from __future__ import annotations

import torch

from .. import _ext
from ..ops.autograd import call, register_autograd
from ..ops.contrastive import contrastive_rows
from ..ops.ms_loss import ms_loss_rows
from ..ops.ms_metrix import label_sorted
from ..ops.unit_rows import unit_rows
from . import register_metrix
from ..distances import is_cosine, is_normalized_l2
from ..ops.circle_metrix import finish_circle_mixed
from ..ops.lifted_metrix import finish_lifted_lses
from ..reducers import zero_loss
from . import circle, generalized_lifted
from . import contrastive as con
from .multi_similarity import _reduce_clean, self_pairs, supports as clean_supports
from .pair_counts import pair_count_tensors

HAS_MS = _ext.has_cuda_kernel("ms_metrix_mix_fwd")
HAS_CON = _ext.has_cuda_kernel("contrastive_metrix_mix_fwd")
HAS_LSE = _ext.has_cuda_kernel("circle_metrix_mix_fwd")
CHUNK = 1024  # rows of whole classes per product S_rows = X_rows Xᵀ (tests set it small)


def register_mix_op(name: str, n_out: int, grad_outputs: tuple, saved_outputs: tuple,
                    long_outputs: tuple = (), refs: bool = False):
    """Fake kernel and autograd of the Metrix op `name`_fwd(x, labels, class_start,
    class_size, *constants) -> n_out per-row outputs (int64 at long_outputs, else x's dtype).
    Its backward is `name`_bwd(*the gradients of grad_outputs, x, labels, class_start,
    class_size, *saved_outputs, *constants) -> dx; the other outputs are not
    differentiable. refs: the op against references, `name`_fwd(x, r, labels, ref_labels,
    self, *constants), whose backward takes those five tensors and need_dr after the
    constants and returns (dx, dr)."""
    fwd = f"metrix_ops::{name}_fwd"
    n_tensors = 5 if refs else 4  # the op's tensor inputs, saved for the backward

    @torch.library.register_fake(fwd)
    def _fake(x, *args):
        return tuple(x.new_empty(x.shape[0], dtype=torch.long if k in long_outputs else None)
                     for k in range(n_out))

    @torch.library.register_fake(f"metrix_ops::{name}_bwd")
    def _fake_bwd(*args):
        x = args[len(grad_outputs)]
        return (torch.empty_like(x), torch.empty_like(args[len(grad_outputs) + 1])) if refs \
            else torch.empty_like(x)

    def setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:n_tensors], *(output[k] for k in saved_outputs))
        ctx.consts = tuple(inputs[n_tensors:])
        ctx.n_inputs = len(inputs)
        fixed = [output[k] for k in range(n_out) if k not in grad_outputs]
        if fixed:
            ctx.mark_non_differentiable(*fixed)

    def backward(ctx, *grads):
        x = ctx.saved_tensors[0]
        # an output nobody used may come back as None; the op wants every gradient it takes
        gs = [x.new_zeros(x.shape[0]) if grads[k] is None else grads[k].contiguous()
              for k in grad_outputs]
        bwd = getattr(torch.ops.metrix_ops, f"{name}_bwd")  # looked up per call (tests spy)
        if not refs:
            return (bwd(*gs, *ctx.saved_tensors, *ctx.consts),) + (None,) * (ctx.n_inputs - 1)
        need_dr = ctx.needs_input_grad[1]
        dx, dr = bwd(*gs, *ctx.saved_tensors, *ctx.consts, need_dr)
        return (dx, dr if need_dr else None) + (None,) * (ctx.n_inputs - 2)

    register_autograd(fwd, backward, setup_context=setup)


# MS: (ℓ̃, lse⁺, lse⁻), the lses saved for the backward; Contrastive: (pos_sum, pos_count,
# neg_sum, neg_count); Circle and GeneralizedLifted: (lse⁺, lse⁻), both differentiable
if HAS_MS:
    register_mix_op("ms_metrix_mix", 3, grad_outputs=(0,), saved_outputs=(1, 2))
if HAS_CON:
    register_mix_op("contrastive_metrix_mix", 4, grad_outputs=(0, 2), saved_outputs=(),
                     long_outputs=(1, 3))
if HAS_LSE:
    for _name in ("circle_metrix_mix", "lifted_metrix_mix"):
        register_mix_op(_name, 2, grad_outputs=(0, 1), saved_outputs=(0, 1))


def class_layout(sorted_labels):
    """Each row's class start and size in a label-sorted batch (int64), from running maxima
    and minima over the rows (no tensor whose size depends on the labels' values, so the
    call traces under torch.compile(fullgraph=True))."""
    b = sorted_labels.shape[0]
    rows = torch.arange(b, device=sorted_labels.device)
    change = sorted_labels[1:] != sorted_labels[:-1]  # a class ends between rows i and i + 1
    first = torch.cat([change.new_ones(min(b, 1)), change])
    last = torch.cat([change, change.new_ones(min(b, 1))])
    start = torch.cummax(torch.where(first, rows, 0), 0).values
    end = torch.cummin(torch.where(last, rows, b).flip(0), 0).values.flip(0)
    return start, end - start + 1


def _sorted_call(op, x_unit, labels, pairs, consts, chunk):
    """op on the label-sorted batch with its class layout, every output back in the caller's
    order."""
    if pairs not in ("pos_neg", "anchor_neg"):
        raise ValueError(f"pairs must be 'pos_neg' or 'anchor_neg', got {pairs!r}")
    xs, ys, inverse = label_sorted(x_unit, labels.long())
    start, size = class_layout(ys)
    out = call(op, xs, ys, start, size, *consts, pairs == "anchor_neg", int(chunk or CHUNK))
    return tuple(t.index_select(0, inverse) for t in out)


def ms_metrix_rows_cuda(x_unit, labels, alpha: float, beta: float, base: float, lam: float,
                        pairs: str = "pos_neg", chunk: int | None = None):
    """ℓ̃(a) for each anchor (B,), in the caller's order, of unit rows x_unit against
    themselves (0 where V(a) is empty); differentiable in x_unit."""
    consts = (float(alpha), float(beta), float(base), float(lam))
    return _sorted_call(torch.ops.metrix_ops.ms_metrix_mix_fwd, x_unit, labels, pairs, consts,
                        chunk)[0]


def con_metrix_rows_cuda(x_unit, labels, cosine: bool, pos_margin: float, neg_margin: float,
                         lam: float, pairs: str = "pos_neg", chunk: int | None = None):
    """Per anchor (pos_sum, pos_count, neg_sum, neg_count) of its Metrix candidates'
    contrastive terms > 0, in the caller's order; the sums differentiable in x_unit."""
    consts = (bool(cosine), float(pos_margin), float(neg_margin), float(lam))
    return _sorted_call(torch.ops.metrix_ops.contrastive_metrix_mix_fwd, x_unit, labels, pairs,
                        consts, chunk)


def lse_metrix_rows_cuda(name: str, x_unit, labels, consts: tuple, lam: float,
                         pairs: str = "pos_neg", chunk: int | None = None):
    """(lse⁺, lse⁻) per anchor of its candidates' exponents (−inf without one), in the
    caller's order, from op `name`_fwd ("circle_metrix_mix" or "lifted_metrix_mix")."""
    op = getattr(torch.ops.metrix_ops, f"{name}_fwd")
    return _sorted_call(op, x_unit, labels, pairs, consts + (float(lam),), chunk)


def _covers(has_op, clean, params, inp, expansion, metrix) -> bool:
    return (has_op and inp.embeddings.device.type == "cuda"
            and clean(params, inp, expansion) and metrix.level == "embedding"
            and metrix.pairs in ("pos_neg", "anchor_neg") and self_pairs(inp))


def metrix_supports(params, inp, expansion, metrix) -> bool:
    return _covers(HAS_MS, clean_supports, params, inp, expansion, metrix)


def metrix_impl(params, inp, reducer, metrix, lam: float):
    """L(clean) + weight · L̃, L̃ the mean of ℓ̃(a) over the anchors with a candidate (with one
    class every ℓ̃(a) is 0, so the sum over B is that mean), as the other engines' glue."""
    xu = unit_rows(inp.embeddings)
    a, b, base = params["alpha"], params["beta"], params["base"]
    rows = ms_loss_rows(xu, xu, inp.labels, inp.labels, True, a, b, base)
    mix = ms_metrix_rows_cuda(xu, inp.labels, a, b, base, lam, metrix.pairs)
    return _reduce_clean(rows, inp, reducer) + metrix.weight * (mix.sum() / max(len(mix), 1))


def con_metrix_supports(params, inp, expansion, metrix) -> bool:
    return _covers(HAS_CON, con.supports, params, inp, expansion, metrix)


def con_metrix_impl(params, inp, reducer, metrix, lam: float):
    """The CPU glue's form (fused/contrastive.py metrix_impl): the clean rows reduced as the
    clean loss does; the mixed term AvgNonZero-reduces its two sides apart over all
    candidates of all anchors, then sums them, whatever the clean loss's reducer."""
    x = inp.embeddings
    window = con._window(reducer)
    if window is None:  # a reducer the ops cannot express: the reference, both terms
        from ..reference.metrix import metrix_loss
        from ..reducers import reduce_loss_dict
        from ..spec import get_spec
        clean = reduce_loss_dict(get_spec("ContrastiveLoss").loss_dict(inp, **params), reducer, x)
        return clean + metrix.weight * metrix_loss("ContrastiveLoss", params, inp, metrix, lam)
    xu = unit_rows(x)
    cosine, pm, nm, (low, high), scale = con.op_form(inp.distance, params, window, x.dtype)
    n_pos, n_neg = pair_count_tensors(inp.labels, inp.ref_labels, inp.same_set)
    clean = contrastive_rows(xu, xu, inp.labels, inp.labels, True, cosine, pm, nm, low, high)
    mixed = con_metrix_rows_cuda(xu, inp.labels, cosine, pm, nm, lam, metrix.pairs)
    return (con._reduce_clean(con._scaled(clean, scale), n_pos, n_neg, reducer, x)
            + metrix.weight * con.mixed_contrastive(con._scaled(mixed, scale), x))


def circle_metrix_supports(params, inp, expansion, metrix) -> bool:
    return _covers(HAS_LSE, circle.supports, params, inp, expansion, metrix)


def circle_metrix_impl(params, inp, reducer, metrix, lam: float):
    """The clean loss (the CUDA engine's circle op) + weight · L̃, L̃ finished from the
    candidates' lses as the CPU glue (ops/circle_metrix.py)."""
    x = inp.embeddings
    clean = circle.impl(params, inp, reducer)
    if not 0.0 < lam < 1.0:  # one side has no label mass: every ℓ̃(a) is 0
        return clean + metrix.weight * zero_loss(x)
    consts = (float(params["m"]), float(params["gamma"]))
    lp, ln = lse_metrix_rows_cuda("circle_metrix_mix", unit_rows(x), inp.labels, consts, lam,
                                  metrix.pairs)
    return clean + metrix.weight * finish_circle_mixed(torch.isfinite(lp), lp + ln, lam, x)


def lifted_metrix_supports(params, inp, expansion, metrix) -> bool:
    d = inp.distance
    return (_covers(HAS_LSE, generalized_lifted.supports, params, inp, expansion, metrix)
            and (is_normalized_l2(d) or is_cosine(d)))


def lifted_metrix_impl(params, inp, reducer, metrix, lam: float):
    """The clean loss (the CUDA engine's gen_lifted op) + weight · L̃, L̃ finished from the
    candidates' lses as the CPU glue (ops/lifted_metrix.py)."""
    x = inp.embeddings
    consts = (is_cosine(inp.distance), float(params["pos_margin"]), float(params["neg_margin"]))
    lp, ln = lse_metrix_rows_cuda("lifted_metrix_mix", unit_rows(x), inp.labels, consts, lam,
                                  metrix.pairs)
    return (generalized_lifted.impl(params, inp, reducer)
            + metrix.weight * finish_lifted_lses(lp, ln, lam, x))


register_metrix("cuda", "MultiSimilarityLoss", metrix_supports, metrix_impl)
register_metrix("cuda", "ContrastiveLoss", con_metrix_supports, con_metrix_impl)
register_metrix("cuda", "CircleLoss", circle_metrix_supports, circle_metrix_impl)
register_metrix("cuda", "GeneralizedLiftedStructureLoss", lifted_metrix_supports,
                lifted_metrix_impl)
