"""What keeps the package working on the oldest versions it promises (README: "Oldest
versions"): torch 2.4's schema inference and dynamo, triton older than the Triton engine
takes. The whole suite runs on them through scripts/oldest_check.sh."""
import typing

import pytest
import torch

import metrix_ops as mo
from metrix_ops.losses.base import overrides_compute_loss
from metrix_ops.triton import launch
from metrix_ops.versions import version_tuple


@pytest.mark.parametrize("text,want", [("3.2.0", (3, 2)), ("3.10.1+git4a5b", (3, 10)),
                                       ("3.5", (3, 5)), ("nightly", (0, 0))])
def test_version_tuple(text, want):
    assert version_tuple(text) == want


def test_schema_hints_in_typing_spelling():
    # torch 2.4's custom_op infers schemas from typing.List/Tuple/Optional only
    assert launch.schema_hint(list[float]) == typing.List[float]
    assert launch.schema_hint(tuple[torch.Tensor, torch.Tensor]) == \
        typing.Tuple[torch.Tensor, torch.Tensor]
    assert launch.schema_hint(typing.Optional[list[int]]) == typing.Optional[typing.List[int]]
    assert launch.schema_hint(torch.Tensor) is torch.Tensor
    assert launch.schema_hint(float) is float


def test_an_old_triton_leaves_the_engine_off_and_says_why(monkeypatch):
    monkeypatch.setattr(launch, "HAS_TRITON", False)
    monkeypatch.setattr(launch, "TRITON_VERSION", "3.0.0")
    assert not launch.usable_on(torch.device("cuda"))
    assert "triton 3.0.0 is installed" in launch.why_not(torch.device("cuda"))
    assert ">= 3.2" in launch.why_not(torch.device("cpu"))
    monkeypatch.setattr(launch, "TRITON_VERSION", None)
    assert launch.why_not(torch.device("cuda")) == "triton is not installed"


def test_the_oldest_triton_versions_the_engine_takes():
    assert launch.MIN_TRITON == (3, 2) and launch.FP64_DOT_TRITON == (3, 5)
    if launch.TRITON_VERSION is not None:
        v = version_tuple(launch.TRITON_VERSION)
        assert launch.HAS_TRITON == (v >= (3, 2)) and launch.FP64_DOT == (v >= (3, 5))


def test_triton_without_fp64_dot_takes_fp32_and_gives_fp64_away(monkeypatch):
    """triton 3.2 to 3.4 (launch.FP64_DOT False): float64 embeddings are not the Triton
    engine's; an explicit backend="triton" says why, "auto" takes the next engine (the CUDA
    one on a GPU: here device objects only, nothing runs on them)."""
    monkeypatch.setattr(launch, "HAS_TRITON", True)
    monkeypatch.setattr(launch, "FP64_DOT", False)
    monkeypatch.setattr(launch, "TRITON_VERSION", "3.2.0")
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    cuda = torch.device("cuda")
    assert launch.usable_on(cuda) and launch.usable_on(cuda, torch.float32)
    assert launch.usable_on(cuda, torch.bfloat16)
    assert not launch.usable_on(cuda, torch.float64)
    why = launch.why_not(cuda, torch.float64)
    assert "triton 3.2.0 cannot multiply float64 tiles" in why and ">= 3.5" in why
    monkeypatch.setattr(mo.backend, "_available", lambda b: True)
    for b in ("cuda", "triton"):
        monkeypatch.setitem(mo.backend.FUSED, b, mo.backend.FUSED[b] | {"MultiSimilarityLoss"})
    monkeypatch.setitem(mo.backend.GPU_ORDER, "MultiSimilarityLoss",
                        ((None, ("triton", "cuda")),))
    order = mo.backend.auto_order
    assert order("MultiSimilarityLoss", cuda, dtype=torch.float32) == ["triton", "cuda"]
    assert order("MultiSimilarityLoss", cuda, dtype=torch.float64) == ["cuda"]
    assert mo.backend.resolve("auto", "MultiSimilarityLoss", cuda, torch.float64) == "cuda"
    assert mo.backend.resolve("triton", "MultiSimilarityLoss", cuda, torch.float32) == "triton"
    with pytest.raises(ValueError, match="cannot multiply float64 tiles"):
        mo.backend.resolve("triton", "MultiSimilarityLoss", cuda, torch.float64)
    monkeypatch.setattr(launch, "FP64_DOT", True)
    assert order("MultiSimilarityLoss", cuda, dtype=torch.float64) == ["triton", "cuda"]


@pytest.mark.skipif(not (launch.HAS_TRITON and launch.interpreting()),
                    reason="needs triton under TRITON_INTERPRET=1")
def test_the_interpreter_runs_the_engines_kernels_here():
    """The probe finds the interpreter working where the Triton tests run (were it broken, as
    triton ≤ 3.6 with numpy ≥ 2.4 is, this names why once, beside the Triton tests'
    failures), and its loop gave the right count."""
    assert launch.interpreter_fault() is None
    assert launch.usable_on(torch.device("cpu"))


def test_a_broken_interpreter_leaves_the_engine_off_and_says_why(monkeypatch):
    """triton ≤ 3.6's interpreter with numpy ≥ 2.4 fails every launch deep inside Triton
    (triton-lang/triton#9171): the engine is then unavailable on CPU tensors, an explicit
    backend="triton" names the fault and the fix, and "auto" never took Triton on a CPU."""
    why = ("triton 3.6.0's interpreter cannot run kernels with numpy 2.4.6 (TypeError: only "
           "0-dimensional arrays ...; triton-lang/triton#9171: ... numpy<2.4 ...)")
    monkeypatch.setattr(launch, "HAS_TRITON", True)
    monkeypatch.setattr(launch, "interpreting", lambda: True)
    monkeypatch.setattr(launch, "interpreter_fault", lambda: why)
    cpu = torch.device("cpu")
    assert not launch.usable_on(cpu) and launch.why_not(cpu) == why
    with pytest.raises(ValueError, match="numpy<2.4"):
        mo.backend.resolve("triton", "MultiSimilarityLoss", cpu, torch.float32)
    assert "triton" not in mo.backend.auto_order("MultiSimilarityLoss", cpu, dtype=torch.float32)
    with pytest.raises(ValueError, match="triton-lang/triton#9171"):
        mo.losses.MultiSimilarityLoss(backend="triton")(torch.randn(6, 4), torch.arange(6) % 2)


def test_a_users_compute_loss_is_known_from_the_class():
    """overrides_compute_loss reads the class's flag under torch.compile (torch 2.4's dynamo
    cannot read a function's __module__), the method itself in eager: both agree."""
    class Mine(mo.losses.ContrastiveLoss):
        def compute_loss(self, *args):
            return super().compute_loss(*args)

    class Theirs(Mine):  # inherits the user's method
        pass

    for cls, user in [(mo.losses.ContrastiveLoss, False), (mo.losses.ProxyAnchorLoss, False),
                      (Mine, True), (Theirs, True)]:
        assert cls._user_compute_loss is user
        loss = cls(num_classes=3, embedding_size=4) if cls is mo.losses.ProxyAnchorLoss else cls()
        assert overrides_compute_loss(loss) is user
    assert mo.losses.MultiSimilarityLoss._param_names == ("alpha", "beta", "base")
