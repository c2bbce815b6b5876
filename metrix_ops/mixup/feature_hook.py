"""Feature-level Metrix on an unmodified network: a forward hook on one submodule (the
paper mixes the last convolutional block's output, before pooling) replaces that
module's output by the mixes of a MixedBatch, so the rest of the network embeds them."""
from __future__ import annotations

import contextlib

import torch

from .mixed_batch import MixedBatch


@contextlib.contextmanager
def mixing_hook(module: torch.nn.Module, mixed: MixedBatch):
    """Within the block, `module`'s output o (B × ...) becomes λ·o[src_a] + (1−λ)·o[src_b]
    (K × ...). Run the network on the clean batch inside it to get the mixed embeddings:

        mixed = mo.mixup.mix_pairs(None, labels, embeddings=emb)
        with mo.mixup.mixing_hook(net.layer4, mixed):
            mixed_emb = net(images)
    """
    if not isinstance(mixed, MixedBatch):
        raise TypeError(f"mixed must be a MixedBatch, got {type(mixed).__name__}")

    def hook(_mod, _inputs, output):
        if not torch.is_tensor(output):
            raise TypeError(f"mixing_hook needs a module whose output is a tensor, got "
                            f"{type(output).__name__}")
        if len(mixed) and int(max(mixed.src_a.max(), mixed.src_b.max())) >= output.shape[0]:
            raise ValueError("the MixedBatch indexes rows the hooked activation does not have")
        lam = mixed.lam
        return lam * output[mixed.src_a] + (1 - lam) * output[mixed.src_b]

    handle = module.register_forward_hook(hook)
    try:
        yield mixed
    finally:
        handle.remove()
