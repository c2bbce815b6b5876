"""pytest plugin: runs the GPU-only tests (tests/test_cuda_*.py) on the CPU, with the CUDA
engine's own kernels under the emulator (build.py, runtime.h). tests/conftest.py registers it
whenever there is no GPU and the build has CUDA kernels, so the normal test command runs them:

    TRITON_INTERPRET=1 python -m pytest -q tests                # emulated where no GPU
    METRIX_OPS_CUDA_EMU=0 python -m pytest -q tests             # skipped instead

An "emulated CUDA tensor" is a CPU tensor tagged as such: made by .cuda(), .to("cuda") or a
factory with device="cuda", and every result of an op with a tagged input is tagged. While a
test runs, such a tensor says is_cuda and device cuda:0, and a metrix_ops op called with one
runs the op's CUDA kernel as emulated (torch.ops.metrix_emu); an op with no CUDA kernel raises,
as it would on a device. .cpu() is a copy back (its gradient goes to the device), and the
ops' own device checks see such a tensor among CUDA ones on another device. So a test that
compares an op on CUDA tensors against the same op on CPU tensors compares the CUDA kernel
against the CPU one, and a loss called with backend="cuda" routes through the glue's CUDA
paths.

What it does not emulate: the Triton engine on CUDA tensors (its own tests run under
TRITON_INTERPRET=1 on CPU tensors; its ops that the CUDA engine shares run so here), and
torch.compile and opcheck of CUDA tensors (a test skips where it calls them), CUDA generators,
streams and memory statistics; tests marked gpu_only are skipped."""
import contextlib
import os
from types import SimpleNamespace

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from cuda_emu import build

_TAG = "_emu_cuda"
_CPU = "_emu_moved_to_cpu"
CUDA = torch.device("cuda", 0)
# tests that need what the emulator does not provide (torch.compile and opcheck trace the
# tensors through their own modes) skip where they call it


def _not_emulated(what):
    def skip(*args, **kwargs):
        pytest.skip(f"cuda_emu: {what} is not emulated (it runs on a GPU)")
    return skip


def is_tagged(t):
    return isinstance(t, torch.Tensor) and t.__dict__.get(_TAG, False)


def _tag(t):
    if isinstance(t, torch.Tensor):
        t.__dict__[_TAG] = True
    return t


def _is_cuda_device(d):
    if isinstance(d, str):
        return d.startswith("cuda")
    return isinstance(d, torch.device) and d.type == "cuda"


_CPU_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


def _other_device(t):
    if isinstance(t, torch.Tensor) and t.__dict__.get(_CPU, False):
        return torch.empty_like(t, device="meta")
    return t


class EmuCudaMode(TorchDispatchMode):
    def __init__(self, ops):
        super().__init__()
        self.ops = ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        made_on_cuda = _is_cuda_device(kwargs.get("device"))
        if made_on_cuda:
            kwargs["device"] = torch.device("cpu")
        tagged = any(is_tagged(a) for a in tree_flatten((args, kwargs))[0])
        ns = func.namespace
        stem = func._schema.name.split("::", 1)[1]
        # the Triton engine's ops, which the CUDA engine shares in places (HPHN's picks), run
        # as they are: under TRITON_INTERPRET=1 on the CPU tensors
        if ns == "metrix_ops" and tagged and not stem.startswith("triton_"):
            if stem not in self.ops:
                raise NotImplementedError(
                    f"cuda_emu: metrix_ops::{stem} has no CUDA kernel (called with CUDA tensors)")
            func = getattr(getattr(torch.ops.metrix_emu, stem), func._overloadname)
            # a tensor moved back to the CPU (.cpu(), .to("cpu")) among CUDA ones reaches the
            # kernel on another device (meta; the kernel called straight), so the op's own
            # device checks see the mix as on a GPU. Other untagged tensors (autograd's zero
            # gradients, made below the modes) pass as they are.
            if any(isinstance(t, torch.Tensor) and t.__dict__.get(_CPU, False)
                   for t in tree_flatten((args, kwargs))[0]):
                args, kwargs = tree_map(_other_device, (args, kwargs))
                return tree_map(_tag, func.redispatch(_CPU_KEYS, *args, **kwargs))
        out = func(*args, **kwargs)
        if tagged or made_on_cuda:
            tree_map(_tag, out)
        return out


class EmuFactoryMode(TorchFunctionMode):
    """torch.tensor(..., device="cuda") and its kin build the tensor below the dispatch modes:
    their device is rewritten here, one level up."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not _is_cuda_device(kwargs.get("device")):
            return func(*args, **kwargs)
        kwargs = dict(kwargs, device=torch.device("cpu"))
        return tree_map(_tag, func(*args, **kwargs))


_ORIG = {}


def _patched_is_cuda(self):
    return is_tagged(self) or _ORIG["is_cuda"].__get__(self)


def _patched_device(self):
    return CUDA if is_tagged(self) else _ORIG["device"].__get__(self)


def _untag(t):
    if isinstance(t, torch.Tensor):
        t.__dict__.pop(_TAG, None)
    return t


class _Transfer(torch.autograd.Function):
    """A copy to the emulated device (to_cuda) or back, whose gradient goes the other way, as
    a real transfer's does."""

    @staticmethod
    def forward(ctx, x, to_cuda):
        ctx.to_cuda = to_cuda
        out = x.clone(memory_format=torch.preserve_format)
        if to_cuda:
            return _tag(out)
        out.__dict__[_CPU] = True
        return _untag(out)

    @staticmethod
    def backward(ctx, g):
        if g is None:
            return None, None
        g = g.clone()
        return (_untag(g) if ctx.to_cuda else _tag(g)), None


def _patched_cpu(self, *args, **kwargs):
    if is_tagged(self):
        return _Transfer.apply(self, False)
    return _ORIG["cpu"](self, *args, **kwargs)


def _patched_cuda(self, *args, **kwargs):
    # Tensor.cuda would ask the CUDA runtime for the current device first
    if is_tagged(self):
        return self
    return _Transfer.apply(self, True)


def _patched_to(self, *args, **kwargs):
    target, rest = kwargs.pop("device", None), []
    for a in args:
        if isinstance(a, (str, torch.device)):
            target = a
        elif isinstance(a, torch.Tensor):  # to(other): other's dtype and device
            rest.append(a.dtype)
            target = CUDA if is_tagged(a) else a.device
        else:
            rest.append(a)
    if target is None:
        return _ORIG["to"](self, *rest, **kwargs)
    out = _ORIG["to"](self, *rest, **kwargs)  # the dtype part, on the CPU
    if _is_cuda_device(target):
        return out if is_tagged(out) else _Transfer.apply(out, True)
    return _Transfer.apply(out, False) if is_tagged(out) else out


def _module_tensors(module):
    return list(module.parameters()) + list(module.buffers())


def _patched_module_cuda(self, device=None):
    # nn.Module.cuda assigns param.data, which keeps the Parameter objects: tag them in place
    for t in _module_tensors(self):
        _tag(t)
    return self


def _patched_module_to(self, *args, **kwargs):
    device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
    if dtype is not None:
        _ORIG["module_to"](self, dtype)
    if device is not None:
        for t in _module_tensors(self):
            (_tag if device.type == "cuda" else _untag)(t)
    return self


@contextlib.contextmanager
def emulated_cuda(ops):
    """Emulated CUDA tensors and ops for the duration (the tensor patches and the mode)."""
    _ORIG.setdefault("is_cuda", torch._C.TensorBase.is_cuda)
    _ORIG.setdefault("device", torch._C.TensorBase.device)
    _ORIG.setdefault("cpu", torch.Tensor.cpu)
    _ORIG.setdefault("to", torch.Tensor.to)
    _ORIG.setdefault("module_to", torch.nn.Module.to)
    _ORIG.setdefault("module_cuda", torch.nn.Module.cuda)
    torch.nn.Module.to = _patched_module_to
    torch.nn.Module.cuda = _patched_module_cuda
    torch.Tensor.is_cuda = property(_patched_is_cuda)
    torch.Tensor.device = property(_patched_device)
    torch.Tensor.cpu = _patched_cpu
    torch.Tensor.cuda = _patched_cuda
    torch.Tensor.to = _patched_to
    try:
        with EmuFactoryMode(), EmuCudaMode(ops):
            yield
    finally:
        for name in ("is_cuda", "device", "cpu", "cuda", "to"):
            delattr(torch.Tensor, name)
        torch.nn.Module.to = _ORIG["module_to"]
        torch.nn.Module.cuda = _ORIG["module_cuda"]


# tests/test_cuda_*.py but the CPU test of the CUDA self ops' block plan
NOT_EMULATED = ("test_cuda_self_plan.py",)


def emulates(path):
    name = os.path.basename(str(path))
    return name.startswith("test_cuda_") and name.endswith(".py") and name not in NOT_EMULATED


NAME = "cuda_emu (CPU)"  # the emulated device's name (torch.cuda.get_device_name)


def emulating():
    """Whether the CUDA tests run on the emulator here (read where they are collected or run):
    a test module may then keep its largest cases for a real GPU."""
    return torch.cuda.is_available() and torch.cuda.get_device_name() == NAME


def wanted():
    """Emulate when there is no device to run the CUDA tests on, the build has CUDA kernels
    to emulate, and METRIX_OPS_CUDA_EMU is not 0."""
    from metrix_ops import _ext
    return (os.environ.get("METRIX_OPS_CUDA_EMU", "1") != "0" and _ext.HAS_CUDA_EXT
            and not torch.cuda.is_available())


class CudaEmuPlugin:
    """Registered by tests/conftest.py when wanted(): the CUDA tests' modules are imported
    and their tests run with an emulated device (emulated_device)."""

    def __init__(self):
        self.ops = build.load()

    @contextlib.contextmanager
    def device(self):
        mp = pytest.MonkeyPatch()
        mp.setattr(torch.cuda, "is_available", lambda: True)
        mp.setattr(torch.cuda, "device_count", lambda: 1)
        mp.setattr(torch.cuda, "_lazy_init", lambda: None)
        mp.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
        mp.setattr(torch.cuda, "current_device", lambda: 0)
        mp.setattr(torch.cuda, "_exchange_device", lambda idx: 0)  # torch.cuda.device(...)
        mp.setattr(torch.cuda, "_maybe_exchange_device", lambda idx: 0)
        mp.setattr(torch.cuda, "get_device_name", lambda *a, **k: NAME)
        props = SimpleNamespace(  # the SM count the emulated kernels see (runtime.h)
            name=NAME, multi_processor_count=int(os.environ.get("EMU_SMS", "2")),
            major=9, minor=0, total_memory=16 << 30)
        mp.setattr(torch.cuda, "get_device_properties", lambda *a, **k: props)
        mp.setattr(torch, "compile", _not_emulated("torch.compile"))
        mp.setattr(torch.library, "opcheck", _not_emulated("torch.library.opcheck"))
        try:
            with emulated_cuda(self.ops):
                yield
        finally:
            mp.undo()

    @pytest.hookimpl(hookwrapper=True)
    def pytest_make_collect_report(self, collector):
        # the modules' skip conditions (torch.cuda.is_available()) are read at import
        if isinstance(collector, pytest.Module) and emulates(collector.path):
            with self.device():
                yield
        else:
            yield

    def pytest_collection_modifyitems(self, config, items):
        skip = pytest.mark.skip(reason="cuda_emu: marked gpu_only (needs a real GPU)")
        for item in items:
            if emulates(item.path) and item.get_closest_marker("gpu_only"):
                item.add_marker(skip)

    def _around(self, item):
        return self.device() if emulates(item.path) else contextlib.nullcontext()

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_setup(self, item):
        with self._around(item):
            yield

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(self, item):
        with self._around(item):
            yield

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_teardown(self, item):
        with self._around(item):
            yield

    def pytest_report_header(self, config):
        return (f"cuda_emu: the CUDA tests run on the CPU emulator ({len(self.ops)} CUDA ops "
                "emulated; METRIX_OPS_CUDA_EMU=0 skips them instead)")
