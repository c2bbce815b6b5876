"""METRIX_OPS_TRITON_TILES, the tile-size override the GPU sweep (benchmarks/sweep_triton.py)
sets: parsed into launch settings, applied to CUDA launches only, bad entries named."""
import pytest
import torch

import metrix_ops.triton as mt

if not mt.HAS_TRITON:  # absent, or older than the engine takes (launch.MIN_TRITON)
    pytest.skip(mt.launch.why_not(torch.device("cpu")), allow_module_level=True)
from metrix_ops.triton import pairs  # noqa: E402


def test_override_parsed_and_applied_on_cuda_only(monkeypatch):
    monkeypatch.setenv("METRIX_OPS_TRITON_TILES", "bm=128, bn=32,bd=16,warps=8,stages=2")
    assert pairs.tile_override() == {"bm": 128, "bn": 32, "bd": 16, "warps": 8, "stages": 2}
    x = torch.empty(300, 40)
    cfg, block_do, launch = pairs.launch_config(x, x)  # CPU tensors: the interpreter's tiles
    monkeypatch.delenv("METRIX_OPS_TRITON_TILES")
    assert (cfg, block_do, launch) == pairs.launch_config(x, x)


def test_gradient_tiles_keep_their_cap(monkeypatch):
    # the override cannot make a gradient tile wider than fits (_GRAD_TILE_BYTES)
    monkeypatch.setattr(pairs, "tile_override", lambda: {"bm": 256, "bn": 256})
    x = torch.empty(4096, 512)
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device("cuda")))
    cfg, block_do, launch = pairs.launch_config(x, x, grad=True)
    cap = pairs._GRAD_TILE_BYTES // (block_do * x.element_size())
    assert cfg["BLOCK_M"] == cfg["BLOCK_N"] == cap and launch["num_warps"] == 8


@pytest.mark.parametrize("spec,word", [("bm=48", "power of two"), ("bm=8", "power of two"),
                                      ("tiles=64", "bad entry"), ("bm=x", "bad entry")])
def test_bad_settings_are_named(monkeypatch, spec, word):
    monkeypatch.setenv("METRIX_OPS_TRITON_TILES", spec)
    with pytest.raises(ValueError, match=word):
        pairs.tile_override()
