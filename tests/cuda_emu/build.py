"""Builds csrc/cuda as plain C++ against the CPU emulator (runtime.h) and loads it: every CUDA
kernel of metrix_ops becomes the CPU kernel of the same op in the mirror namespace metrix_emu
(torch.ops.metrix_emu.<op>, the same schema as torch.ops.metrix_ops.<op>).

    python tests/cuda_emu/build.py        # build (cached in build/cuda_emu) and list the ops

The build is torch.utils.cpp_extension.load's (ninja, MAX_JOBS jobs): the transformed sources
are rewritten only when they change, so a rebuild recompiles only what changed.

With EMU_ASAN=1 the emulator is built with AddressSanitizer (into build/cuda_emu_asan), so that
a kernel's read or write past a tensor's memory stops the process with ASan's report, as
compute-sanitizer's memcheck would on a GPU. Its runtime must be loaded first:
scripts/emu_memcheck.sh runs the CUDA tests that way."""
import contextlib
import fcntl
import glob
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
ASAN = os.environ.get("EMU_ASAN") == "1"
OUT = os.path.join(ROOT, "build", "cuda_emu_asan" if ASAN else "cuda_emu")
# the host helpers csrc/cuda calls that live in the CPU sources (no op registrations there)
HOST_SOURCES = ["csrc/checks.cpp", "csrc/cpu/ee_layout.cpp", "csrc/cpu/refs_runs.cpp"]

_ops = None


def _write_if_changed(path, text):
    if os.path.exists(path):
        with open(path) as f:
            if f.read() == text:
                return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def transformed_sources():
    sys.path.insert(0, os.path.dirname(HERE))
    from cuda_emu.transform import transform
    runtime = os.path.join(HERE, "runtime.h")
    sources = []
    # csrc/cuda, and the emulator's own test kernels (tests/test_emu_runtime.py)
    paths = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu*")))
    for path in paths + [os.path.join(HERE, "selftest.cu")]:
        rel = os.path.relpath(path, ROOT)
        with open(path) as f:
            text = transform(f.read(), runtime, rel)
        name = os.path.basename(path)
        if name.endswith(".cu"):
            name = name[:-3] + "_emu.cpp"
            sources.append(os.path.join(OUT, "src", "cuda", name))
        _write_if_changed(os.path.join(OUT, "src", "cuda", name), text)
    return sources


def _mirror_schemas():
    """Defines in metrix_emu every metrix_ops op the CUDA sources did not define there
    themselves (those the CPU sources define), with the same schema."""
    lib = torch.library.Library("metrix_emu", "FRAGMENT")  # noqa: F841 - kept alive below
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("metrix_ops::"))
    for full in names:
        stem = full.split("::", 1)[1]
        try:
            torch._C._dispatch_find_schema_or_throw("metrix_emu::" + stem, "")
            continue  # defined by a transformed TORCH_LIBRARY_FRAGMENT
        except RuntimeError:
            pass
        schema = str(getattr(torch.ops.metrix_ops, stem).default._schema)
        lib.define(schema.split("::", 1)[1])
    return lib


def load(verbose=False):
    """Builds (if needed) and loads the emulated kernels; returns the set of op stems that
    have one (torch.ops.metrix_emu.<stem>)."""
    global _ops, _lib
    if _ops is not None:
        return _ops
    import metrix_ops  # noqa: F401 - the metrix_ops schemas first
    from torch.utils import cpp_extension
    os.makedirs(os.path.join(OUT, "obj"), exist_ok=True)
    # pytest -n (xdist): the workers load the emulator at once. The transform's writes and the
    # build under one lock, so that no worker rewrites a source (and ninja relinks the .so)
    # while another builds or has loaded it; the later workers find everything up to date.
    with _lock(os.path.join(OUT, "build.lock")):
        _build(cpp_extension, verbose)
    _lib = _mirror_schemas()
    _ops = frozenset(
        n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names()
        if n.startswith("metrix_emu::")
        and torch._C._dispatch_has_kernel_for_dispatch_key(n, "CPU"))
    return _ops


@contextlib.contextmanager
def _lock(path):
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build(cpp_extension, verbose):
    sources = (transformed_sources() + [os.path.join(HERE, "runtime.cpp")]
               + [os.path.join(ROOT, s) for s in HOST_SOURCES])
    os.environ.setdefault("MAX_JOBS", "2")
    cflags = ["-O2", "-ffp-contract=off", "-Wno-unused-function"]
    ldflags = []
    if ASAN:
        if not asan_loaded():
            raise RuntimeError("EMU_ASAN=1: AddressSanitizer's runtime must be loaded first "
                               "(LD_PRELOAD=$(gcc -print-file-name=libasan.so); "
                               "scripts/emu_memcheck.sh does it)")
        cflags = ["-O1", "-fsanitize=address", "-fno-omit-frame-pointer"] + cflags[1:]
        ldflags = ["-fsanitize=address"]
    cpp_extension.load(
        name="metrix_emu_asan_C" if ASAN else "metrix_emu_C", sources=sources,
        build_directory=os.path.join(OUT, "obj"),
        extra_include_paths=[os.path.join(OUT, "src"), os.path.join(ROOT, "csrc")],
        extra_cflags=cflags, extra_ldflags=ldflags, is_python_module=False, verbose=verbose)


_lib = None


def asan_loaded():
    """Whether AddressSanitizer's runtime is mapped into this process."""
    with open("/proc/self/maps") as f:
        return "libasan" in f.read()

if __name__ == "__main__":
    ops = load(verbose="-v" in sys.argv)
    print(f"{len(ops)} emulated CUDA ops:", " ".join(sorted(ops)))
