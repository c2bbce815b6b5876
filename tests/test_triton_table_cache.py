"""The Metrix and EE ops' chunk tables (and the triplet kernels' slot count) handed from the
forward op to its backward
(triton/table_cache.py): one build per step; the same gradients whether the backward takes
the forward's table or builds its own; never a table for other contents (an in-place write, a
bigger table set, an inference tensor)."""
import pytest
import torch

import metrix_ops as mo
from metrix_ops.triton import table_cache
from cases import assert_close_vg
from triton_cases import DEVICE, on_dev, requires_triton


@pytest.fixture(autouse=True)
def _fresh_cache():
    table_cache.clear()
    yield
    table_cache.clear()


def _counting_build(value):
    calls = []

    def build():
        calls.append(1)
        return value
    return build, calls


def test_the_backward_takes_what_the_forward_kept_once():
    labels = torch.tensor([0, 0, 1, 2, 2])
    build, calls = _counting_build("table")
    assert table_cache.handed((labels,), "k", build, backward=False) == "table"
    assert table_cache.handed((labels,), "k", build, backward=True) == "table"
    assert len(calls) == 1
    table_cache.handed((labels,), "k", build, backward=True)  # taken away: built again
    assert len(calls) == 2


def test_other_contents_or_keys_are_never_served():
    labels = torch.tensor([0, 0, 1, 2, 2])
    build, calls = _counting_build("table")
    table_cache.handed((labels,), "k", build, backward=False)
    table_cache.handed((labels,), "other", build, backward=True)  # another extra key
    table_cache.handed((labels[:4],), "k", build, backward=True)   # another shape
    table_cache.handed((labels.clone(),), "k", build, backward=True)  # another address
    assert len(calls) == 4
    labels[1] = 3  # an in-place write bumps the version: the kept table is stale
    table_cache.handed((labels,), "k", build, backward=True)
    assert len(calls) == 5


def test_inference_tensors_and_old_entries_are_not_kept():
    with torch.inference_mode():
        labels = torch.tensor([0, 1])
        build, calls = _counting_build("t")
        table_cache.handed((labels,), "k", build, backward=False)
        table_cache.handed((labels,), "k", build, backward=True)
    assert len(calls) == 2
    first = torch.tensor([0, 1])
    build, calls = _counting_build("t")
    table_cache.handed((first,), "k", build, backward=False)
    for i in range(table_cache._SIZE):  # later forwards push the first entry out
        table_cache.handed((torch.tensor([i]),), "k", build, backward=False)
    table_cache.handed((first,), "k", build, backward=True)
    assert len(calls) == table_cache._SIZE + 2


def _ms_metrix(backend):
    return mo.losses.MultiSimilarityLoss(backend=backend, metrix=mo.Metrix(weight=0.5))


def _ee_ms(backend):
    return mo.losses.MultiSimilarityLoss(backend=backend, expansion=mo.Expansion(n_points=2))


def _triplet(backend):  # the "all"-triplets kernels' slot count (the largest class's)
    return mo.losses.TripletMarginLoss(margin=0.3, backend=backend)


@requires_triton
@pytest.mark.parametrize("make", [_ms_metrix, _ee_ms, _triplet], ids=["metrix", "ee", "triplet"])
def test_a_training_step_builds_each_table_once(make):
    x = torch.randn(12, 5, dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4, 4])
    x, y = on_dev(x, y)
    loss = make("triton")
    e = x.detach().clone().requires_grad_(True)
    loss(e, y, lam=0.3) if loss.metrix is not None else loss(e, y)
    kept = table_cache.stats["kept"]
    assert kept >= 1  # the forward op kept its table
    before = table_cache.stats["taken"]
    out = loss(e, y, lam=0.3) if loss.metrix is not None else loss(e, y)
    out.backward()
    assert table_cache.stats["taken"] == before + 1  # the backward took it: no second build


@requires_triton
@pytest.mark.parametrize("make", [_ms_metrix, _ee_ms, _triplet], ids=["metrix", "ee", "triplet"])
def test_gradients_are_the_same_with_or_without_the_kept_table(make, monkeypatch):
    x = torch.randn(11, 6, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 3])
    x, y = on_dev(x, y)
    loss = make("triton")
    call = {"lam": 0.6} if loss.metrix is not None else {}
    taken = table_cache.stats["taken"]
    with_kept = assert_close_vg(lambda e: loss(e, y, **call),
                                lambda e: make("reference")(e, y, **call), x)
    assert table_cache.stats["taken"] > taken
    monkeypatch.setattr(table_cache, "_take", lambda *a: None)  # every backward builds
    without = assert_close_vg(lambda e: loss(e, y, **call),
                              lambda e: make("reference")(e, y, **call), x)
    torch.testing.assert_close(with_kept, without)
