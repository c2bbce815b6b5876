"""Rewrites a csrc/cuda source so that it compiles as plain C++ against runtime.h:

- kernel<<<cfg>>>(args) becomes ::emu::launch(::emu::Cfg(cfg), "kernel", [&] { kernel(args); });
- the includes of ATen/cuda and c10/cuda headers become runtime.h (prepended to every file);
- __shared__ T name[D0][D1] becomes __shared__ ::emu::Shared<T, (D0), (D1)> name{"name"} (its
  accesses bounds-checked and recorded for the race check), at::empty and at::empty_like
  ::emu::empty and ::emu::empty_like (filled with NaN or a byte pattern, as a GPU's recycled
  memory is not zero), __syncthreads() a call that names its site (a runtime.h macro);
- TORCH_LIBRARY_IMPL(metrix_ops, CUDA, m) registers the kernels as the CPU kernels of the
  mirror namespace metrix_emu, and TORCH_LIBRARY_FRAGMENT(metrix_ops, m) defines the
  CUDA-only ops there; .is_cuda() checks become .is_cpu() (the emulated "device" is the CPU).

Nothing else changes: the kernels' arithmetic and indexing, their launch geometry and the
host code are the sources' own, which is the point."""
import re

_INCLUDE = re.compile(r'^[ \t]*#include[ \t]*<(ATen/cuda|c10/cuda)/[^>]*>[ \t]*$', re.M)
_IDENT = re.compile(r"[A-Za-z0-9_:]")
_SHARED = re.compile(r"__shared__\s+([^;\[\]]+?)\s+(\w+)\s*((?:\[[^\]]+\])+)\s*;")
_EMPTY = re.compile(r"\bat::(empty|empty_like)\s*\(")


def _shared_array(m):
    dims = ", ".join(f"({d.strip()})" for d in re.findall(r"\[([^\]]+)\]", m.group(3)))
    return f'__shared__ ::emu::Shared<{m.group(1)}, {dims}> {m.group(2)}{{"{m.group(2)}"}};'


def _kernel_start(src, end):
    """Start of the kernel expression (identifier with optional template arguments) that
    ends just before src[end]."""
    i = end - 1
    while i >= 0 and src[i].isspace():
        i -= 1
    if src[i] == ">":  # template arguments: back to the matching "<"
        depth = 0
        while i >= 0:
            if src[i] == ">":
                depth += 1
            elif src[i] == "<":
                depth -= 1
                if depth == 0:
                    break
            i -= 1
        i -= 1
        while i >= 0 and src[i].isspace():
            i -= 1
    while i >= 0 and _IDENT.match(src[i]):
        i -= 1
    return i + 1


def _matching(src, open_at, open_ch="(", close_ch=")"):
    depth = 0
    for k in range(open_at, len(src)):
        if src[k] == open_ch:
            depth += 1
        elif src[k] == close_ch:
            depth -= 1
            if depth == 0:
                return k
    raise ValueError(f"unbalanced {open_ch} at offset {open_at}")


def rewrite_launches(src):
    out, pos = [], 0
    while True:
        at = src.find("<<<", pos)
        if at < 0:
            out.append(src[pos:])
            return "".join(out)
        start = _kernel_start(src, at)
        kernel = src[start:at].strip()
        cfg_end = src.index(">>>", at)
        cfg = src[at + 3:cfg_end]
        paren = cfg_end + 3
        while src[paren].isspace():
            paren += 1
        if src[paren] != "(":
            raise ValueError(f"no argument list after the launch of {kernel}")
        close = _matching(src, paren)
        args = src[paren + 1:close]
        name = kernel.split("<")[0]
        out.append(src[pos:start])
        # a call in a lambda, run by every emulated thread: default arguments and implicit
        # conversions behave as in the launch (the arguments are re-evaluated per thread:
        # the launchers pass plain values and data pointers)
        out.append(f'::emu::launch(::emu::Cfg({cfg}), "{name}", [&] {{ {kernel}({args}); }})')
        pos = close + 1


def transform(src, runtime_path, origin):
    src = _INCLUDE.sub("", src)
    src = rewrite_launches(src)
    src = re.sub(r"TORCH_LIBRARY_IMPL\(\s*metrix_ops\s*,\s*CUDA\s*,",
                 "TORCH_LIBRARY_IMPL(metrix_emu, CPU,", src)
    src = re.sub(r"TORCH_LIBRARY_FRAGMENT\(\s*metrix_ops\s*,", "TORCH_LIBRARY_FRAGMENT(metrix_emu,",
                 src)
    src = src.replace(".is_cuda()", ".is_cpu()")
    src = _SHARED.sub(_shared_array, src)
    src = _EMPTY.sub(r"::emu::\1(", src)
    return f'#include "{runtime_path}"\n#line 1 "{origin}"\n' + src
