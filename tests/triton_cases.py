"""What the Triton engine's test files share: the device the kernels run on (a GPU, or CPU
tensors under TRITON_INTERPRET=1), the skip mark when neither is there, and compiling a kernel
for an H100 (sm_90) without a GPU."""
from __future__ import annotations

import pytest
import torch

import metrix_ops.triton as mt

DEVICE = torch.device("cuda" if torch.cuda.is_available() and not mt.interpreting() else "cpu")
requires_triton = pytest.mark.skipif(not mt.usable_on(DEVICE),
                                     reason="Triton cannot run here (needs CUDA or TRITON_INTERPRET=1)")


def widest_dtype():
    """The widest dtype the engine's products take here, with the tolerance of a comparison of
    two runs of the same kernels (compiled against eager): float64 (triton >= 3.5 multiplies
    float64 tiles), else float32, so that those tests run on triton 3.2 to 3.4 too."""
    from metrix_ops.triton.launch import FP64_DOT
    if FP64_DOT:
        return torch.float64, dict(rtol=1e-9, atol=1e-12)
    return torch.float32, dict(rtol=1e-5, atol=1e-6)


def on_dev(*ts):
    # leaves on the device: t.to(cuda) of a leaf that requires grad is a non-leaf, whose .grad
    # stays None (on the CPU, under the interpreter, .to is the tensor itself)
    return [t.detach().to(DEVICE).requires_grad_(t.requires_grad) for t in ts]


def ast_source(fn, signature: dict, constexprs: dict):
    """triton.compile's source of kernel `fn`: `signature` its argument types by name, and the
    values of its constexpr arguments (by index from triton 3.3, by name in 3.2)."""
    import inspect

    from triton.compiler import ASTSource
    if "constexprs" in inspect.signature(ASTSource).parameters:
        return ASTSource(fn, signature,
                         constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return ASTSource(fn, signature, constants=dict(constexprs))


def compile_sm90(fn, constexprs: dict, float_type: str, num_warps: int = 4,
                 pointer_types: dict | None = None):
    """Compiles @triton.jit kernel `fn` for sm_90 (what the interpreter cannot check: types of
    loop-carried values, tl.dot shapes, shared memory). Pointer arguments are `float_type`
    ("fp32"/"fp64") unless their name says labels ("lab", "y_ptr"); the other runtime
    arguments are i32; `pointer_types` overrides by name (e.g. {"out_ptr": "*i64"}). Needs a
    process where TRITON_INTERPRET is unset. fp64 with a triton older than 3.5 compiles
    nothing (launch.FP64_DOT)."""
    import triton
    from triton.backends.compiler import GPUTarget

    from metrix_ops.triton.launch import FP64_DOT
    if float_type == "fp64" and not FP64_DOT:
        return None  # this triton cannot tl.dot fp64 tiles: the engine never launches them

    def kind(n):
        if n in constexprs:
            return "constexpr"
        if pointer_types and n in pointer_types:
            return pointer_types[n]
        if n.endswith("_ptr"):
            return "*i64" if "lab" in n or n in ("y_ptr", "yr_ptr") else "*" + float_type
        return "i32"

    # constexpr parameters with a default (e.g. MINE=False) take it unless given
    constexprs = dict({p.name: p.default for p in fn.params
                       if p.is_constexpr and p.has_default}, **constexprs)
    src = ast_source(fn, {n: kind(n) for n in fn.arg_names}, constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def run_sm90_script(body: str):
    """Runs `body` (Python that compiles kernels with compile_sm90 and exits non-zero on a
    failure) in a subprocess without TRITON_INTERPRET, where triton.jit gives real kernels;
    skips where this triton has no CUDA backend. `sys`, `tl` and compile_sm90 are imported
    for it."""
    import os
    import subprocess
    import sys
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        pytest.skip("this triton has no CUDA backend to compile with")
    here = os.path.dirname(os.path.abspath(__file__))
    script = ("import sys\nimport triton.language as tl\nsys.path.insert(0, sys.argv[1])\n"
              "from triton_cases import compile_sm90\n" + body)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", script, here], env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]


# the sm_90 compilation tests run where kernels cannot (on a GPU they run instead)
compiles_only = pytest.mark.skipif(DEVICE.type == "cuda", reason="on a GPU the kernels run")
