"""What the installed torch's torch.compile can do, probed once, so that the compile tests check
on an older torch what it does instead (README: "Oldest versions"). Probed rather than read
from the version: the versions in between were not all tried."""
from __future__ import annotations

import contextlib
import functools

import pytest
import torch


@functools.lru_cache(maxsize=None)
def compiled_asserts_fire() -> bool:
    """Whether Inductor keeps torch._assert_async, which carries a compiled loss's data checks
    (NaN, label and index ranges): torch 2.4 and 2.6 drop it from CPU graphs, 2.14 keeps it."""
    def f(x):
        torch._assert_async(torch.isfinite(x.min()), "probe")
        return x * 2
    try:
        torch.compile(f, fullgraph=True)(torch.tensor([float("nan")]))
    except RuntimeError:
        return True
    return False


def fails_loudly(call, match: str) -> None:
    """The compiled call's run-time check raises (`match`), where Inductor keeps the check.
    Where it drops it (torch 2.4, 2.6) nothing is promised of the result (a miner may drop the
    NaN pairs and give a finite loss): the call runs, or raises from a kernel's own check (an
    index kernel's IndexError on torch 2.6, where a label is past the proxies)."""
    if compiled_asserts_fire():
        with pytest.raises(RuntimeError, match=match):
            call()
        return
    try:
        call()
    except (RuntimeError, IndexError):
        pass


@functools.lru_cache(maxsize=None)
def traces_data_dependent_shapes() -> bool:
    """Whether dynamo's default config traces an op whose output size depends on the data
    (repeat_interleave by counts, as EE's segment lists; nonzero, as NPairs' kept pairs):
    torch 2.14 does, 2.4 and 2.6 need capture_dynamic_output_shape_ops, and 2.9 needs it for
    nonzero only."""
    try:
        torch.compile(lambda t: (t.repeat_interleave(t), t.nonzero()), fullgraph=True,
                      backend="eager")(torch.tensor([1, 2]))
    except Exception:  # dynamo's Unsupported
        return False
    finally:
        torch._dynamo.reset()
    return True


def data_dependent_shapes():
    """The dynamo setting a fullgraph compile of Embedding Expansion needs on a torch whose
    default does not trace its segment lists (what a user of that torch sets too)."""
    if traces_data_dependent_shapes():
        return contextlib.nullcontext()
    return torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True)
