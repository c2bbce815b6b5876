"""The reference training run under torchrun (metrix_ops/training/distributed.py): the
sampler's rank shards, one step's gradients in a two-process gloo group against the same
step in one process, and a two-process run of `python -m metrix_ops.train`."""
import json
import os
import socket
import subprocess
import sys
import tempfile

import pytest
import torch

import train_distributed_cases as tc
from metrix_ops.training.sampler import ClassBalancedBatches

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed is not available")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world", [2, 3])
def test_rank_shards_interleave_to_the_single_process_stream(world):
    labels = torch.arange(61) % 7
    one = list(ClassBalancedBatches(labels, 3, 2, seed=4))
    shards = [list(ClassBalancedBatches(labels, 3, 2, seed=4, rank=r, world_size=world))
              for r in range(world)]
    n = len(one) // world
    assert all(len(s) == n for s in shards) and n >= 1
    assert [shards[t % world][t // world] for t in range(n * world)] == one[:n * world]
    tiny = [list(ClassBalancedBatches(labels[:5], 1, 2, rank=r, world_size=4)) for r in range(4)]
    assert all(len(s) == 1 for s in tiny)  # fewer batches than ranks: one each
    with pytest.raises(ValueError, match="rank"):
        ClassBalancedBatches(labels, 3, 2, rank=2, world_size=2)


@pytest.fixture(scope="module")
def ranks():
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as d:
        store = os.path.join(d, "port")
        for attempt in range(2):
            with open(store, "w") as f:
                f.write(str(free_port()))
            try:
                mp.spawn(tc.rank_main, args=(store, d), nprocs=tc.WORLD)
                break
            except mp.ProcessExitedException:
                # a rank killed by a signal: once on torch 2.4.1 in CI (gloo's rendezvous
                # aborted, SIGABRT; the same code passed alone), so a port taken between
                # free_port() and the bind; a second try with a fresh port, not a third
                if attempt == 1:
                    raise
        return [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=False)
                for r in range(tc.WORLD)]


def test_setup_reads_torchrun_environment(ranks):
    assert [r["ranks"] for r in ranks] == [(k, tc.WORLD) for k in range(tc.WORLD)]


@pytest.mark.parametrize("key", [c[0] for c in tc.CASES])
def test_one_step_gradients_equal_one_process(ranks, key):
    """Model and loss-parameter gradients after the step's backward and sync_grads equal
    one process's over all ranks' rows: the gathered loss (DDP's average; the proxies'
    world × gradient divided back), or the ranks' own losses averaged (feature/input-level
    Metrix). Equal on every rank."""
    for r in ranks:
        got, want = r[key], r[key + "/oracle"]
        assert len(got) == len(want)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_ranks_stop_together_and_share_state(ranks):
    """step_value's verdict is every rank's (a NaN on rank 1 stops rank 0 too); the logged
    loss is the ranks' mean of loss / scale; the per-rank mode starts from rank 0's
    parameters and buffers (the ranks seeded them differently)."""
    assert [r["finite"] for r in ranks] == [(True, False)] * tc.WORLD
    assert [r["mean"] for r in ranks] == [0.75] * tc.WORLD
    for a, b in zip(ranks[0]["per-rank-state"], ranks[1]["per-rank-state"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert float(ranks[1]["per-rank-state"][-3][0]) == 5.0  # rank 0's running mean
    for a, b in zip(ranks[0]["per-rank-buffers"], ranks[1]["per-rank-buffers"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert float(ranks[0]["per-rank-buffers"][0][0]) != 5.0  # the step moved them


def test_torchrun_training_run():
    """Two processes of the reference run: rank 0 alone writes the result, which records the
    world size, and training lifts R@1 on the unseen classes above the untrained network's."""
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               f"--master_port={free_port()}", "-m", "metrix_ops.train", "--epochs", "2",
               "--quiet", "--out", d]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.count("final evaluation") == 1 and "2 processes" in out.stdout
        (name,) = os.listdir(d)
        with open(os.path.join(d, name)) as f:
            res = json.load(f)
    assert res["world_size"] == 2
    hist = res["history"]
    assert [h["epoch"] for h in hist] == [0, 1, 2]
    assert hist[-1]["precision_at_1"] > hist[0]["precision_at_1"] + 0.05
