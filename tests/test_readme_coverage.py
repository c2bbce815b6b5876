"""The README's coverage table (loss × clean / Metrix / EE / miner=) says what each engine
fuses; this checks every cell against the engines' registries (metrix_ops.fused), and its
"n/a" marks against the options each loss defines, so the table stays true when an engine
gains or loses an op."""
import os
import re

import pytest
import torch

import metrix_ops as mo
from metrix_ops import fused

ENGINES = ("cpu", "triton", "cuda")
README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def table_rows():
    text = open(README, encoding="utf-8").read()
    block = re.search(r"<!-- coverage: [^>]*-->\n(.*?)<!-- /coverage -->", text, re.S)
    assert block, "README.md has no coverage table"
    rows = {}
    for line in block.group(1).splitlines()[2:]:  # past the header and its rule
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        name = cells[0].split()[0]
        rows[name] = [(set(re.findall(r"\b(cpu|triton|cuda)\b", c.split("(")[0])),
                       c if c in ("n/a", "tuple") else None) for c in cells[1:]]
    return rows


def registered(table: dict, name: str) -> set:
    return {e for e in ENGINES if (e, name) in table}


def expansion_engines(name: str) -> set:
    """EE ops are registered apart from the clean op, except the CPU engine's HPHN op, which
    takes the expansion itself: probed with a call (NotImplementedError where not covered)."""
    engines = registered(fused.EXPANSION_IMPLS, name)
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.tensor([0, 0, 1, 1, 2] * 2)
    ctor = (3, 4) if name.startswith("Proxy") else ()  # num_classes, embedding_size
    try:
        getattr(mo.losses, name)(*ctor, backend="cpu", expansion=mo.Expansion(n_points=1))(x, y)
        engines.add("cpu")
    except NotImplementedError:
        pass
    return engines


def test_the_table_lists_every_loss_of_the_engines():
    names = {n for (_, n) in fused.IMPLS}
    assert set(table_rows()) == names


@pytest.mark.parametrize("name", sorted({n for (_, n) in fused.IMPLS}))
def test_each_cell_equals_the_registries(name):
    import metrix_ops.triton  # noqa: F401  (registers the Triton engine's ops)
    from metrix_ops.triton.launch import HAS_TRITON
    # without triton its modules register nothing: compare the other engines
    here = set(ENGINES) if HAS_TRITON else {"cpu", "cuda"}
    from metrix_ops.reference.expansion import EXPANSION_LOSSES
    from metrix_ops.reference.metrix_soft_forms import SOFT_FORMS
    from metrix_ops.spec import get_spec
    cells = table_rows()[name]
    have = [registered(fused.IMPLS, name), registered(fused.METRIX_IMPLS, name),
            expansion_engines(name), registered(fused.MINER_IMPLS, name)]
    for column, (said, mark), got in zip(("clean", "Metrix", "EE", "miner="), cells, have):
        assert said & here == got & here, f"{name}, {column}: README {said}, registered {got}"
        assert mark is None or not got, f"{name}, {column}: {mark} beside fused engines"
    # "n/a": the option is not defined for the loss; "tuple": miner= takes the tuple path
    defined = [True, name in SOFT_FORMS, name in EXPANSION_LOSSES,
               get_spec(name).supports_indices_tuple]
    for column, (_, mark), ok in zip(("clean", "Metrix", "EE", "miner="), cells, defined):
        assert (mark == "n/a") == (not ok), f"{name}, {column}: {mark}, defined: {ok}"
    assert cells[3][1] != "tuple" or defined[3]
