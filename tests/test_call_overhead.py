"""benchmarks/call_overhead.py's split of a loss call: the fused op found wherever autograd
nests it, and the parts adding up to the profiled step."""
import os
import sys

import pytest
import torch

from metrix_ops import _ext

pytestmark = pytest.mark.skipif(not _ext.HAS_EXT, reason="needs the compiled extension")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))


@pytest.mark.parametrize("loss,op", [("multi_similarity", "ms_loss_self"),
                                     ("proxy_anchor", "proxy_anchor_grad")])
def test_split_finds_the_op_forward_and_backward(loss, op):
    from call_overhead import profiled_split
    from bench_losses import case_step
    from metrix_ops.ops.unit_rows import HAS_CPU_OP

    step = case_step(loss, "cpu", 24, 8)
    step()
    s = profiled_split(step, steps=3)
    names = s["op_names"]
    # the loss op's forward and backward once a step (the backward nested under an autograd
    # node), beside the compiled helpers; every op counted once
    assert names[f"metrix_ops::{op}_fwd"] == names[f"metrix_ops::{op}_bwd"] == 1
    assert s["op_calls"] == sum(names.values())
    if HAS_CPU_OP:  # the normalisation, both ways (ProxyAnchor: of the batch and the proxies)
        per_side = 1 if loss == "multi_similarity" else 2
        assert names["metrix_ops::unit_rows_fwd"] == names["metrix_ops::unit_rows_bwd"] == per_side
    assert s["op_us"] > 0 and s["glue_ops"] >= 1
    assert s["op_us"] + s["glue_ops_us"] + s["outside_ops_us"] == pytest.approx(
        s["profiled_step_us"], rel=1e-9)
    assert not any(name.startswith("metrix_ops::") for name in s["top_glue_ops_us"])


def test_split_of_a_step_without_the_op():
    from call_overhead import profiled_split

    x = torch.randn(7, 5, requires_grad=True)

    def step():  # plain ATen: no fused op, every event is glue
        torch.autograd.grad((x @ x.t()).sum(), x)

    s = profiled_split(step, steps=2)
    assert s["op_calls"] == 0 and s["op_us"] == 0 and s["op_names"] == {}
    assert s["glue_ops"] >= 2 and "aten::matmul" in s["top_glue_ops_us"]


def test_hotspots_rank_by_own_time():
    from call_overhead import python_hotspots

    def step():
        sum(i * i for i in range(2000))

    rows = python_hotspots(step, steps=3, n=4)
    own = [r["own_us_per_step"] for r in rows]
    assert own == sorted(own, reverse=True) and len(rows) <= 4
    assert any("genexpr" in r["function"] for r in rows)
