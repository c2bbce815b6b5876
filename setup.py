"""Build of metrix_ops: the Python package plus the compiled extension metrix_ops._C.

csrc/cpu always builds; csrc/cuda builds whenever a CUDA toolkit and a CUDA build of torch
are present. Environment:
  METRIX_OPS_CUDA=1 / 0   force the CUDA part on (error if impossible) / off
  METRIX_OPS_NO_EXT=1     no extension at all (pure-Python install; backend "reference")
  CUDA_HOME               toolkit root; found in /usr/local/cuda* when unset, because the
                          `nvcc` on PATH may be a wrapper script torch would misread
  TORCH_CUDA_ARCH_LIST    defaults to 9.0: one architecture keeps a 2-core build short
"""
import glob
import os
import shutil
import site
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _is_toolkit(path):
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and \
        os.path.isfile(os.path.join(path, "include", "cuda_runtime.h"))


def find_cuda_home():
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if _is_toolkit(env):
        return env
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        try:  # a wrapper script: `exec /usr/local/cuda-X/bin/nvcc "$@"`
            with open(real, "r", errors="ignore") as f:
                for tok in f.read(4096).split():
                    if tok.endswith("/bin/nvcc"):
                        candidates.append(os.path.dirname(os.path.dirname(tok)))
        except OSError:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if _is_toolkit(c):
            return c
    return None


def wheel_cuda_include_dirs(torch_dir):
    """Headers torch's CUDA headers need (cusparse.h, cublas_v2.h, ...) that may exist only
    in the pip `nvidia-*` wheels torch brings (nvidia/cu13/include, nvidia/cusparse/include,
    ...), not in a minimal toolkit. Looked up beside torch first, wherever it is installed."""
    roots = [os.path.dirname(torch_dir)]
    try:
        roots += site.getsitepackages() + [site.getusersitepackages()]
    except AttributeError:  # old virtualenv's site module
        pass
    dirs = []
    for sp in roots:
        dirs += sorted(glob.glob(os.path.join(sp, "nvidia", "*", "include")))
    seen, out = set(), []
    for d in dirs:
        if os.path.isdir(d) and os.path.realpath(d) not in seen:
            seen.add(os.path.realpath(d))
            out.append(d)
    return out


def extensions():
    if os.environ.get("METRIX_OPS_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    force = os.environ.get("METRIX_OPS_CUDA")
    cuda_home = find_cuda_home()
    can_cuda = torch.version.cuda is not None and cuda_home is not None
    if force == "1" and not can_cuda:
        sys.exit("METRIX_OPS_CUDA=1 but no CUDA build of torch or no CUDA toolkit was found "
                 f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={cuda_home})")
    use_cuda = can_cuda and force != "0"

    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    # torch picks the C++ standard (C++20 with 2.14 here, C++17 with the GPU machine's 2.11):
    # the sources stay C++17 (tests/test_cpp_standard.py)
    cxx = ["-O3", "-fopenmp"]
    define_macros = []
    if use_cuda:
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home  # torch read CUDA_HOME at import time
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        define_macros.append(("METRIX_OPS_WITH_CUDA", None))
        # appended after torch's -I flags, so the toolkit's own headers win where both exist
        extra_inc = [f"-I{d}" for d in wheel_cuda_include_dirs(os.path.dirname(torch.__file__))]
        ext = cpp_extension.CUDAExtension(
            "metrix_ops._C", sources, define_macros=define_macros,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx + extra_inc,
                                "nvcc": ["-O3", "--expt-relaxed-constexpr"] + extra_inc},
            extra_link_args=["-fopenmp"])
    else:
        ext = cpp_extension.CppExtension(
            "metrix_ops._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    # Say which build this is: a silent CPU-only build is the usual surprise on a GPU box.
    print(f"metrix_ops: building the extension for CPU{' + CUDA' if use_cuda else ' only'} "
          f"(torch {torch.__version__}, torch CUDA {torch.version.cuda}, CUDA_HOME={cuda_home}, "
          f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST') if use_cuda else '-'})",
          file=sys.stderr)
    os.environ.setdefault("MAX_JOBS", "2")
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = extensions()

# Name, version, dependencies, packages and the console script live in pyproject.toml.
setup(ext_modules=ext_modules, cmdclass=cmdclass)
