import os
import sys

# tests import their shared helpers (cases.py) as plain modules
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402
import torch  # noqa: E402

# pytest -n N (xdist, the README's test command): N worker processes share the cores. Each
# takes its share of intra-op threads, where N times all of them would oversubscribe (most of
# the suite is the Triton interpreter's and the CUDA emulator's single-threaded Python and
# fibers; the tests that check several threads set their own count).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
if _WORKERS:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))


@pytest.fixture(scope="module")
def one_thread():
    """For modules of thousands of tiny ops: thread hand-offs cost more than the work."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def no_tf32():
    """fp32 products in fp32: the CUDA tests' fp32 tolerances are not TF32's (10-bit
    mantissa, the benchmarks' choice)."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


# triton 3.2 to 3.4 cannot tl.dot float64 tiles (metrix_ops.triton.launch.FP64_DOT): there the
# Triton engine refuses float64 inputs with this message, and a test that runs its kernels on
# float64 reports as skipped for that reason (the float32 tests still run; any other failure
# stays a failure). With triton >= 3.5 nothing is skipped this way.
FP64_REFUSALS = ("cannot multiply float64 tiles", "Unsupported lhs dtype fp64")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if call.excinfo is None or report.outcome != "failed":
        return
    from metrix_ops.triton import launch
    text = str(call.excinfo.value)
    if launch.HAS_TRITON and not launch.FP64_DOT and any(m in text for m in FP64_REFUSALS):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0,
                           f"Skipped: triton {launch.TRITON_VERSION} has no float64 tl.dot")


def pytest_terminal_summary(terminalreporter):
    """With a broken Triton interpreter (launch.interpreter_fault: triton ≤ 3.6 with numpy ≥
    2.4) every Triton test fails inside Triton or on the engine being off; the reason, once,
    at the end of the report (-q included)."""
    from metrix_ops.triton import launch
    fault = launch.interpreter_fault()
    if fault:
        terminalreporter.write_sep("=", "Triton interpreter unusable here", red=True)
        terminalreporter.write_line(fault)


def pytest_configure(config):
    """Without a GPU, the CUDA tests (test_cuda_*.py) run the CUDA engine's own kernels on the
    CPU emulator (tests/cuda_emu) instead of skipping: METRIX_OPS_CUDA_EMU=0 turns it off."""
    from cuda_emu import plugin
    if plugin.wanted():
        config.pluginmanager.register(plugin.CudaEmuPlugin(), "cuda_emu")
