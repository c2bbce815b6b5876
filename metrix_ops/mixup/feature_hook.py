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
    (K × ...; λ per row when the MixedBatch has one per row). Run the network on the clean
    batch inside it to get the mixed embeddings — the model's code is not touched:

        emb = net(images)                                       # clean pass
        mixed = mo.mixup.mix_pairs(None, labels, embeddings=emb)  # choose pairs only
        with mo.mixup.mixing_hook(net.layer4, mixed):
            mixed_emb = net(images)                             # mixed pass
        loss = loss_fn(emb, labels, mixed_embeddings=mixed_emb, mixed=mixed)

    The modules before `module` run on the clean batch again (their output is the clean
    activation, so gradients reach them through both passes); the modules after it see K
    rows. Layers that use batch statistics after the hook (BatchNorm in train mode)
    therefore normalise the mixed batch by its own statistics.
    """
    if not isinstance(mixed, MixedBatch):
        raise TypeError(f"mixed must be a MixedBatch, got {type(mixed).__name__}")
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")

    def hook(_mod, _inputs, output):
        if not torch.is_tensor(output):
            raise TypeError(f"mixing_hook needs a module whose output is a tensor, got "
                            f"{type(output).__name__}")
        if len(mixed) and int(max(mixed.src_a.max(), mixed.src_b.max())) >= output.shape[0]:
            raise ValueError(f"the MixedBatch indexes rows up to "
                             f"{int(max(mixed.src_a.max(), mixed.src_b.max()))} but the hooked "
                             f"activation has {output.shape[0]} rows")
        return mixed.mix(output)

    handle = module.register_forward_hook(hook)
    try:
        yield mixed
    finally:
        handle.remove()
