"""What every Triton loss module shares: whether Triton can run on a tensor's device, and the
tile sizes of a launch.

Triton kernels run on CUDA tensors, or on CPU tensors under `TRITON_INTERPRET=1` (slow and
exact: that is how the CPU test run checks them). The interpreter is chosen by Triton when a
kernel is decorated, so the variable must be set before metrix_ops is imported."""
from __future__ import annotations

import functools
import inspect
import os
import types
import typing

import torch

from ..versions import version_tuple

# The oldest triton the engine takes (torch 2.6 brings 3.2; 2.4 and 2.5 bring 3.0 and 3.1)
MIN_TRITON = (3, 2)
# fp64 inputs need tl.dot of fp64 tiles, which triton 3.2, 3.3 and 3.4 refuse ("Unsupported
# lhs dtype fp64"; 3.5 and 3.6 take it, checked under the interpreter): with those, the engine
# takes fp32 (and halves, computed in fp32) and "auto" gives fp64 to the next engine
FP64_DOT_TRITON = (3, 5)


try:
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    TRITON_VERSION = triton.__version__
    # torch 2.4 and 2.5 bring triton 3.0 and 3.1: the engine is then unavailable, not broken
    HAS_TRITON = version_tuple(TRITON_VERSION) >= MIN_TRITON
    FP64_DOT = version_tuple(TRITON_VERSION) >= FP64_DOT_TRITON
except ImportError:  # a CPU-only install without triton: backend="triton" is unavailable
    TRITON_VERSION, HAS_TRITON, FP64_DOT = None, False, False


# The custom ops that read tensor data on the host (label layouts, chunk tables, slot counts)
# or whose backward takes a table its forward read: a CUDA graph cannot capture the read, and
# would replay the captured call's table. Tagged (torch >= 2.9), torch.compile(mode=
# "reduce-overhead") leaves them out of its CUDA graphs (csrc/common/op_tags.h: the CUDA
# engine's ops of the same kind).
_CUDAGRAPH_UNSAFE = getattr(torch.Tag, "cudagraph_unsafe", None)
HOST_READS = {"tags": (_CUDAGRAPH_UNSAFE,)} if _CUDAGRAPH_UNSAFE is not None else {}


def schema_hint(hint):
    """An annotation as torch.library's schema inference of every supported torch reads it:
    `list[float]` as `typing.List[float]`, `tuple[...]` as `typing.Tuple[...]`, `X | None` as
    `typing.Optional[X]` (torch 2.4 knows only typing's spelling)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is None or not args:
        return hint
    args = tuple(schema_hint(a) for a in args)
    if origin is list:
        return typing.List[args]
    if origin is tuple:
        return typing.Tuple[args]
    if origin in (typing.Union, getattr(types, "UnionType", typing.Union)):  # (3.10+)
        return typing.Union[args]
    return hint


def triton_op(name: str, host_reads: bool = False):
    """torch.library.custom_op (no mutated inputs) for a Triton launcher: tagged where it
    reads the host (HOST_READS), and run with its first CUDA tensor's device current. Triton
    launches on the current device, and a caller may have another one current: the library's
    own calls make it so (driver.op_scope), but a graph compiled by a backend other than
    Inductor (whose wrapper sets it) calls the op without them."""
    def register(fn):
        @functools.wraps(fn)
        def on_tensors_device(*args, **kwargs):
            t = next((a for a in args if torch.is_tensor(a) and a.is_cuda), None)
            if t is None:
                return fn(*args, **kwargs)
            with torch.cuda.device(t.device):
                return fn(*args, **kwargs)
        # the schema from fn's annotations resolved where fn lives (custom_op would evaluate
        # string annotations in this module's globals), in typing's spelling
        hints, sig = typing.get_type_hints(fn), inspect.signature(fn)
        on_tensors_device.__signature__ = sig.replace(
            parameters=[p.replace(annotation=schema_hint(hints.get(p.name, p.annotation)))
                        for p in sig.parameters.values()],
            return_annotation=schema_hint(hints.get("return", sig.return_annotation)))
        return torch.library.custom_op(name, mutates_args=(),
                                       **(HOST_READS if host_reads else {}))(on_tensors_device)
    return register


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _version_text(v: tuple) -> str:
    return ".".join(map(str, v))


_FAULT: list = []  # interpreter_fault's answer, once probed


def interpreter_fault() -> str | None:
    """None where Triton's interpreter runs the engine's kernels here, else why it cannot.
    triton ≤ 3.6's interpreter takes a scalar argument's value (a loop bound such as
    `range(0, M, BLOCK_N)`, in nearly every kernel here) by int() of a one-element numpy
    array, which numpy ≥ 2.4 refuses (triton-lang/triton#9171, fixed in later triton): every
    launch then fails deep in the interpreter. Probed once, by running such a loop, in an
    eager call: while torch.compile traces, None (the probe is a launch and a host read,
    which the trace must not hold; an eager call has made it, or the kernels fail as they
    would have)."""
    if not (HAS_TRITON and interpreting()) or torch.compiler.is_compiling():
        return None
    if not _FAULT:
        _FAULT.append(_probe())
    return _FAULT[0]


def _probe() -> str | None:
    try:
        out = torch.zeros(1)
        _probe_kernel[(1,)](out, 3)
        if out.item() == 3:
            return None
        fault = f"a loop over a scalar argument gave {out.item()} for 3"
    except Exception as e:  # noqa: BLE001  (whatever the interpreter raises is the reason)
        fault = f"{type(e).__name__}: {e}"
    import numpy
    return (f"triton {TRITON_VERSION}'s interpreter cannot run kernels with numpy "
            f"{numpy.__version__} ({fault}; triton-lang/triton#9171: numpy >= 2.4 needs a "
            "later triton, or install numpy<2.4 for TRITON_INTERPRET=1)")


if HAS_TRITON:
    @triton.jit
    def _probe_kernel(out_ptr, n):
        acc = tl.zeros((1,), dtype=tl.float32)
        for _ in range(0, n, 1):  # the interpreter's int() of a scalar argument
            acc += 1.0
        tl.store(out_ptr + tl.arange(0, 1), acc)


def usable_on(device: torch.device, dtype: torch.dtype | None = None) -> bool:
    """Can a Triton kernel take tensors on `device` (of `dtype`, where given: fp64 needs
    FP64_DOT)?"""
    if not HAS_TRITON or (dtype == torch.float64 and not FP64_DOT):
        return False
    if device.type == "cuda":
        return not interpreting()
    return device.type == "cpu" and interpreting() and interpreter_fault() is None


def why_not(device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The reason `usable_on(device, dtype)` is False, for the error message."""
    if TRITON_VERSION is None:
        return "triton is not installed"
    if not HAS_TRITON:
        return (f"triton {TRITON_VERSION} is installed and the Triton engine needs triton >= "
                f"{_version_text(MIN_TRITON)}")
    if dtype == torch.float64 and not FP64_DOT:
        return (f"triton {TRITON_VERSION} cannot multiply float64 tiles (tl.dot of float64 "
                f"needs triton >= {_version_text(FP64_DOT_TRITON)}); use float32 embeddings, "
                "or backend='auto', which gives float64 to the next engine")
    if device.type == "cuda":
        return "TRITON_INTERPRET=1 is set, which runs Triton kernels on CPU tensors only"
    fault = interpreter_fault() if device.type == "cpu" else None
    if fault is not None:
        return fault
    return (f"Triton kernels need CUDA tensors (got tensors on {device}); on a CPU they run "
            "only under TRITON_INTERPRET=1, set before metrix_ops is imported")


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def row_block(n_rows: int, device: torch.device) -> int:
    """Rows (or columns) per tile. tl.dot needs at least 16; the interpreter runs one numpy
    program per tile, so fewer, larger tiles are what makes it fast there."""
    cap = 64 if device.type == "cuda" else 32
    return max(16, min(cap, next_pow2(n_rows)))


def dim_block(d: int, device: torch.device) -> int:
    """Feature columns per step of a tile's dot-product loop (the tile of X is never whole D
    wide on a GPU: 64 rows × 512 fp32 would not fit in registers)."""
    cap = 64 if device.type == "cuda" else 128
    return max(16, min(cap, next_pow2(d)))
