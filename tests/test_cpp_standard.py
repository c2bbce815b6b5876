"""The C++/CUDA sources stay C++17: the GPU machine's torch (2.11) builds extensions with
-std=c++17 and its system GCC lacks some C++20 library parts, while this machine's torch 2.14
builds with C++20, so a C++20-only construct compiles here and fails there (std::bit_cast
did, on the first H200 build). This scans for the C++20 library headers and facilities the
sources could plausibly reach for."""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "csrc"
SOURCES = sorted(p for p in ROOT.rglob("*") if p.suffix in (".h", ".cpp", ".cu", ".cuh"))
CXX20 = [
    (r"#include\s*<(bit|span|numbers|concepts|ranges|format|source_location|compare|"
     r"stop_token|semaphore|latch|barrier|coroutine)>", "a C++20 header"),
    (r"std::(bit_cast|span|popcount|countl_zero|countr_zero|has_single_bit|bit_width|"
     r"numbers::|ranges::|format\(|lerp|midpoint|ssize|to_address)", "a C++20 facility"),
    (r"\bconsteval\b|\bconstinit\b|\bco_await\b|\bco_return\b|\brequires\s*\(|<=>",
     "a C++20 keyword or operator"),
    (r"\{\s*\.[A-Za-z_]\w*\s*=", "a designated initializer"),
    (r"\[[^\]]*\]\s*<\s*(typename|class|auto)\b", "a template lambda"),
]


def test_sources_found():
    assert len(SOURCES) > 20, SOURCES


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(ROOT)) for p in SOURCES])
def test_no_cxx20_only_constructs(path):
    text = path.read_text()
    code = re.sub(r"//[^\n]*", "", text)  # comments may name them
    for pattern, what in CXX20:
        m = re.search(pattern, code)
        assert m is None, f"{path.name}: {what} ({m.group(0)!r}); keep csrc C++17"
