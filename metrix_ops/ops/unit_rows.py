"""Rows scaled to unit L2 norm, as F.normalize(x, dim=1) (eps 1e-12), with a backward in
three passes: dx = (g − y (y·g)) / ‖x‖. torch's own backward of x / ‖x‖ goes through the
division's and the norm's generic rules, about ten passes over B×D where this takes three,
which at B = 4096, D = 512 was 6.5 ms against 2.5 ms of a ~50 ms ProxyAnchor loss. On fp32
and fp64 CPU tensors each direction is one compiled op (csrc/cpu/unit_rows_cpu.cpp): one pass,
where the PyTorch form is three ops forward and seven backward, most of the cost at small
batches. The fused engines normalise with it; the reference keeps F.normalize, as PML."""
from __future__ import annotations

import torch

from .. import _ext
from .autograd import check_one_transform, once_differentiable

EPS = 1e-12  # F.normalize's
HAS_CPU_OP = _ext.has_op("unit_rows_fwd")

if HAS_CPU_OP:
    @torch.library.register_fake("metrix_ops::unit_rows_fwd")
    def _fake_fwd(x):
        return torch.empty_like(x), x.new_empty(x.shape[0], 1)

    @torch.library.register_fake("metrix_ops::unit_rows_bwd")
    def _fake_bwd(grad, y, norm):
        return torch.empty_like(y)


def cpu_op(x: torch.Tensor) -> bool:
    """Whether x takes the compiled CPU op: fp32 or fp64 rows on the CPU (half precision keeps
    the PyTorch form, which computes in the tensor's own dtype as F.normalize does)."""
    return (HAS_CPU_OP and x.device.type == "cpu" and x.dim() == 2
            and x.dtype in (torch.float32, torch.float64))


def one_kernel(x: torch.Tensor) -> bool:
    """Whether the forward and backward run as one Triton kernel each (triton/unit_rows.py):
    on CUDA tensors where Triton runs, where the ten small PyTorch launches are a per-call
    cost. CPU tensors keep the PyTorch form (its passes are not launches there)."""
    if x.device.type != "cuda" or x.dim() != 2:
        return False
    from ..triton.launch import usable_on
    return usable_on(x.device)


def _forward(x):
    if one_kernel(x):
        from ..triton.unit_rows import unit_rows_fwd
        return unit_rows_fwd(x)
    if cpu_op(x):
        return torch.ops.metrix_ops.unit_rows_fwd(x)
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    return x / norm.clamp_min(EPS), norm


def _backward(ctx, g, _g_norm):
    y, norm = ctx.saved_tensors
    if one_kernel(y):
        from ..triton.unit_rows import unit_rows_bwd
        return unit_rows_bwd(g, y, norm)
    if cpu_op(y):
        return torch.ops.metrix_ops.unit_rows_bwd(g, y, norm)
    # a backward run inside an autocast region would take vecdot to bf16: the fused
    # losses compute in fp32 under autocast, their normalisation's gradient too
    with torch.autocast(device_type=g.device.type, enabled=False):
        # the projection off y, except where the norm was clamped (F.normalize's
        # clamp_min passes no gradient to the norm there: dx = g / eps)
        dot = torch.linalg.vecdot(g, y, dim=1).unsqueeze(1).masked_fill_(norm < EPS, 0)
        return torch.addcmul(g, y, dot, value=-1).div_(norm.clamp_min(EPS))


_backward = once_differentiable(_backward, "metrix_ops::unit_rows")


class _UnitRows(torch.autograd.Function):
    # forward(ctx, ...) rather than forward + setup_context: torch 2.4's dynamo traces only
    # this form, and apply skips binding the signature (~13 µs a call)
    @staticmethod
    def forward(ctx, x):
        y, norm = _forward(x)
        ctx.save_for_backward(y, norm)
        ctx.mark_non_differentiable(norm)
        return y, norm

    backward = staticmethod(_backward)


class _UnitRowsForTransforms(torch.autograd.Function):
    # the same in the form torch.func's transforms require (grad, vjp: a separate
    # setup_context), taken only while one is active. No vmap rule: the compiled ops have none.
    @staticmethod
    def forward(x):
        return _forward(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*output)
        ctx.mark_non_differentiable(output[1])

    backward = staticmethod(_backward)


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """F.normalize(x, dim=1)'s value and gradient, cheaper to differentiate."""
    if not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active():
        check_one_transform("metrix_ops::unit_rows")
        return _UnitRowsForTransforms.apply(x)[0]
    return _UnitRows.apply(x)[0]


def normalized(distance, x: torch.Tensor) -> torch.Tensor:
    """distance.maybe_normalize(x), through unit_rows for the L2 norm."""
    if distance.normalize_embeddings and distance.p == 2:
        return unit_rows(x)
    return distance.maybe_normalize(x)
