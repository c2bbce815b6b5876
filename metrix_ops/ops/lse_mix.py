"""The glue shared by the embedding-level Metrix ops of CircleLoss and
GeneralizedLiftedStructureLoss (csrc/cpu/circle_metrix_self_cpu.cpp,
lifted_metrix_self_cpu.cpp): each returns, per anchor of a label-sorted batch against itself,
the two log-sum-exps lse⁺(a) = log Σ_v e^{pos(s̃_v)}, lse⁻(a) = log Σ_v e^{neg(s̃_v)} over
its mixed candidates v (−inf without one), both differentiable; the loss's own use of them
(label weights λ, 1 − λ, empty sides, softplus / hinge, reduction) is PyTorch in
ops/circle_metrix.py and ops/lifted_metrix.py. Here: fake kernels for torch.compile,
autograd, and the sorted call."""
from __future__ import annotations

import torch

from .. import _ext
from .autograd import call, register_autograd
from .ms_metrix import group_entries, label_sorted, refs_sorted


def register(name: str, n_out: int = 4):
    """Fake kernel and autograd of `metrix_ops::{name}_fwd(x, labels, *params)` → n_out
    per-anchor values (the candidates' lse⁺, lse⁻, then the clean pairs'), whose backward is
    `{name}_bwd(*grads, x, labels, *values, *params)` → dx."""
    if not _ext.HAS_EXT:
        return
    fwd = f"metrix_ops::{name}_fwd"

    @torch.library.register_fake(fwd)
    def _fake(x, labels, *params):
        return tuple(x.new_empty(x.shape[0]) for _ in range(n_out))

    @torch.library.register_fake(f"metrix_ops::{name}_bwd")
    def _fake_bwd(*args):
        return torch.empty_like(args[n_out])

    def _setup(ctx, inputs, output):
        x, labels, *params = inputs
        ctx.save_for_backward(x, labels, *output)
        ctx.params = tuple(params)

    def _backward(ctx, *grads):
        x, labels, *values = ctx.saved_tensors
        # an output nobody used may come back as None; the op wants every row gradient
        gs = [torch.zeros_like(values[0]) if g is None else g.contiguous() for g in grads]
        dx = getattr(torch.ops.metrix_ops, f"{name}_bwd")(*gs, x, labels, *values, *ctx.params)
        return (dx, None) + (None,) * len(ctx.params)

    register_autograd(fwd, _backward, setup_context=_setup)


def register_refs(name: str, n_out: int = 4):
    """Fake kernel and autograd of `metrix_ops::{name}_fwd(x, r, labels, ref_labels, self,
    *params, group)` → n_out per-anchor values (lse⁺, lse⁻ against references, and Circle's
    clean lse⁺, lse⁻), whose backward `{name}_bwd(*grads, x, r, labels, ref_labels, self,
    *values, *params, group, need_dr)` → (dx, dr)."""
    if not _ext.HAS_EXT:
        return
    fwd = f"metrix_ops::{name}_fwd"

    @torch.library.register_fake(fwd)
    def _fake(x, r, labels, ref_labels, self_rows, *params):
        return tuple(x.new_empty(x.shape[0]) for _ in range(n_out))

    @torch.library.register_fake(f"metrix_ops::{name}_bwd")
    def _fake_bwd(*args):
        x, r = args[n_out], args[n_out + 1]
        return torch.empty_like(x), torch.empty_like(r)

    def _setup(ctx, inputs, output):
        x, r, labels, ref_labels, self_rows, *params = inputs
        ctx.save_for_backward(x, r, labels, ref_labels, self_rows, *output)
        ctx.params = tuple(params)

    def _backward(ctx, *grads):
        x, r, labels, ref_labels, self_rows, *values = ctx.saved_tensors
        # an output nobody used may come back as None; the op wants every row gradient
        gs = [torch.zeros_like(values[0]) if g is None else g.contiguous() for g in grads]
        dx, dr = getattr(torch.ops.metrix_ops, f"{name}_bwd")(
            *gs, x, r, labels, ref_labels, self_rows, *values, *ctx.params,
            ctx.needs_input_grad[1])
        return (dx, dr if ctx.needs_input_grad[1] else None) + (None,) * (3 + len(ctx.params))

    register_autograd(fwd, _backward, setup_context=_setup)


def check_pairs(pairs: str):
    if pairs not in ("pos_neg", "anchor_neg"):
        raise ValueError(f"pairs must be 'pos_neg' or 'anchor_neg', got {pairs!r}")


def lse_rows(name: str, x_unit, labels, params: tuple, lam: float, pairs: str, block: int,
             clean: bool = False):
    """(lse⁺, lse⁻ of the candidates, lse⁺, lse⁻ of the clean pairs — −inf unless clean),
    each (B,), in the caller's order, from op `name` on the sorted batch: candidates
    mix(p, n, λ), n ∈ N(a), p ∈ P(a) for pairs "pos_neg" (a itself when P(a) is empty),
    p = a for "anchor_neg"."""
    check_pairs(pairs)
    xs, ys, inverse = label_sorted(x_unit, labels)
    out = call(getattr(torch.ops.metrix_ops, f"{name}_fwd"), xs, ys, *params, float(lam),
               pairs == "anchor_neg", bool(clean), int(block))
    return tuple(t.index_select(0, inverse) for t in out)


def lse_refs_rows(name: str, x_unit, r_unit, labels, ref_labels, self_idx, params: tuple,
                  lam: float, pairs: str, extra: tuple = ()):
    """lse_rows of the anchors against references, from op `name`: the candidates mix(p, n, λ)
    of a reference positive p (not self_idx[a], a's own row of them; −1: none) and a reference
    negative n, or mix(a, n) (no such p, or "anchor_neg"); `extra`: the op's arguments after
    anchor_neg (Circle's clean), and then every output of the op, in the caller's order."""
    check_pairs(pairs)
    *args, inverse = refs_sorted(x_unit, r_unit, labels, ref_labels, self_idx)
    out = call(getattr(torch.ops.metrix_ops, f"{name}_fwd"), *args, *params, float(lam),
               pairs == "anchor_neg", *extra, group_entries())
    return tuple(t.index_select(0, inverse) for t in out)


def lse_terms(name: str, x_unit, labels, params: tuple, lam: float, pairs: str, block: int,
              refs=None, clean: bool = False):
    """The four per-anchor lses (candidates', then clean pairs') of op `{name}_self` on the
    batch against itself, or of `{name}_refs` against refs = (unit references, their labels,
    each anchor's own row of them or −1)."""
    if refs is None:
        return lse_rows(f"{name}_self", x_unit, labels, params, lam, pairs, block, clean)
    r_unit, ref_labels, own = refs
    return lse_refs_rows(f"{name}_refs", x_unit, r_unit, labels, ref_labels, own, params, lam,
                         pairs, (bool(clean),))
