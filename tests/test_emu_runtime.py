"""The CPU emulator of the CUDA execution model (tests/cuda_emu), on its own test kernels
(cuda_emu/selftest.cu, built through the same source rewriting as csrc/cuda): warp shuffles
and ballots against their definitions, shared memory across __syncthreads, 2-D grid and block
indices, atomics, and the faults it must report rather than compute through. Runs wherever the
CUDA tests run on the emulator (no GPU, a build with CUDA kernels)."""
import os
import subprocess
import sys

import pytest
import torch

from cuda_emu import plugin

pytestmark = pytest.mark.skipif(not plugin.wanted(),
                                reason="the CUDA tests run on a GPU here, or the emulator is off")


@pytest.fixture(autouse=True)
def _index_order(monkeypatch):
    # the faults' messages name the first thread to fault: index order unless a test sets
    # another (EMU_ORDER=shuffle:SEED on the whole run must not change them)
    monkeypatch.setenv("EMU_ORDER", "forward")


@pytest.fixture(scope="module")
def emu():
    from cuda_emu import build
    build.load()
    return torch.ops.metrix_emu


@pytest.mark.parametrize("threads", [32, 96])
def test_warp_operations(emu, threads):
    g = torch.Generator().manual_seed(threads)
    x = torch.randn(threads, generator=g)
    total, down, idx, ballot = emu.emu_selftest_warp(x)
    lanes = torch.arange(threads) % 32
    warps = x.view(-1, 32)
    torch.testing.assert_close(total, warps.sum(1, keepdim=True).expand(-1, 32).reshape(-1),
                               rtol=1e-6, atol=1e-6)
    nxt = torch.where(lanes < 31, torch.roll(x, -1), x)  # the warp's last lane keeps its own
    assert torch.equal(down, nxt)
    assert torch.equal(idx, x.view(-1, 8)[:, 3:4].expand(-1, 8).reshape(-1))
    bits = (warps > 0).long() << torch.arange(32)
    want = bits.sum(1).to(torch.int64)
    assert torch.equal(ballot.long() & 0xffffffff,
                       want.repeat_interleave(32) & 0xffffffff)


def test_shared_memory_across_syncthreads(emu, monkeypatch):
    x = torch.randn(64 * 5, generator=torch.Generator().manual_seed(3))
    want = x.view(5, 64).flip(1).reshape(-1)
    assert torch.equal(emu.emu_selftest_block(x), want)
    monkeypatch.setenv("EMU_ORDER", "reverse")  # the fibers in the other order: the same result
    assert torch.equal(emu.emu_selftest_block(x), want)


def test_grid_and_block_indices_and_atomics(emu):
    out, counter = emu.emu_selftest_index(torch.empty(0))
    want = torch.tensor([[bx, by, tx, ty] for by in range(2) for bx in range(3)
                         for ty in range(2) for tx in range(4)], dtype=torch.int32)
    assert torch.equal(out, want)
    assert int(counter) == 3 * 2 * 4 * 2


@pytest.mark.parametrize("reverse", [False, True])
def test_shared_memory_checks_pass_a_correct_kernel(emu, monkeypatch, reverse):
    # a tree sum (reads after writes, a barrier between) and a total every thread reads: no
    # race reported, in either fiber order
    if reverse:
        monkeypatch.setenv("EMU_ORDER", "reverse")
    x = torch.randn(64 * 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    sums, fresh = emu.emu_selftest_shared(x.float())
    want = x.view(3, 64).sum(1, keepdim=True).expand(-1, 64).reshape(-1).float()
    torch.testing.assert_close(sums, want, rtol=1e-5, atol=1e-5)
    # each block finds shared memory as 0xff bytes (NaN), not the previous block's values
    assert torch.isnan(fresh).all()


@pytest.mark.parametrize("order", ["forward", "reverse", "shuffle:1", "shuffle:2"])
def test_launch_orders(emu, monkeypatch, order):
    """EMU_ORDER runs the blocks (and each block's threads) in the order it names: the order
    the blocks took their tickets in, and which writer a racy write keeps."""
    monkeypatch.setenv("EMU_ORDER", order)
    ran, last_block, last_thread = emu.emu_selftest_order(torch.empty(0))
    ran = ran.tolist()
    assert sorted(ran) == list(range(6))  # every block of the 3 x 2 grid ran once
    if order == "forward":
        assert ran == list(range(6)) and last_block.tolist() == [5]
        assert last_thread.tolist() == [7] * 6  # the 4 x 2 block's last thread wrote last
    elif order == "reverse":
        assert ran == list(range(5, -1, -1)) and last_block.tolist() == [0]
        assert last_thread.tolist() == [0] * 6
    else:
        assert ran not in (list(range(6)), list(range(5, -1, -1)))
        assert last_block.tolist() == [ran[-1]]
        # the same seed, the same order; the threads' order is redrawn per block
        assert emu.emu_selftest_order(torch.empty(0))[0].tolist() == ran
        assert len(set(last_thread.tolist())) > 1
    # a racy kernel's outcome depends on the order: what tests/test_cuda_launch_order.py uses
    # to find races in global memory


def test_launch_order_is_checked(emu, monkeypatch):
    monkeypatch.setenv("EMU_ORDER", "shuffled")
    with pytest.raises(RuntimeError, match="EMU_ORDER=shuffled .expected forward, reverse or"):
        emu.emu_selftest_order(torch.empty(0))


def test_unwritten_allocations_are_poisoned(emu):
    f, i, like = emu.emu_selftest_empty(torch.zeros(4, dtype=torch.float64))
    assert torch.isnan(f).all() and torch.isnan(like).all() and like.dtype == torch.float64
    assert (i == 0x5a5a5a5a).all()


@pytest.mark.parametrize("which,message", [(0, "divergent warp operation"),
                                           (1, "has exited"),
                                           (2, "empty grid"),
                                           (3, "partial mask"),
                                           (4, r"race on slot\[1\].*threads 0 and 1"),
                                           (5, r"out of bounds: half\[16\]"),
                                           (6, "divergent barrier")])
def test_faults_are_reported(emu, which, message):
    with pytest.raises(RuntimeError, match=message):
        emu.emu_selftest_fault(torch.empty(0), which)
    # the emulator is usable after a fault (3: an exception thrown inside a fiber)
    x = torch.randn(32, generator=torch.Generator().manual_seed(1))
    assert torch.equal(emu.emu_selftest_warp(x)[2], x.view(-1, 8)[:, 3:4].expand(-1, 8).reshape(-1))


_PAST_END = """
import torch, metrix_ops
from cuda_emu import build
build.load()
print(float(torch.ops.metrix_emu.emu_selftest_past_end(torch.ones(7))[0]))
"""


@pytest.mark.skipif(os.environ.get("EMU_ASAN") != "1",
                    reason="AddressSanitizer's build: scripts/emu_memcheck.sh")
def test_a_read_past_a_tensor_is_reported_under_asan():
    # ASan stops the process at the fault, so the kernel runs in a child process (the same
    # environment: the ASan build, its runtime preloaded)
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=here + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, "-c", _PAST_END], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode != 0
    assert "heap-buffer-overflow" in run.stderr and "READ of size 4" in run.stderr
    assert "cuda_emu: in kernel past_the_end_kernel (grid 1x1x1, block 1x1x1)" in run.stderr
