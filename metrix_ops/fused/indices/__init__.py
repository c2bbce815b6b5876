"""Fused CPU ops for calls with an indices_tuple (registered with fused.register_indices):
the loss over the listed pairs or triplets only, from the listed pairs' similarities
(ops/pair_sims.py), never a B×M matrix. One module per family of PML semantics:
pair_lists (a pair listed twice is two terms), anchor_masks (the pairs as a mask: once),
triplet, npairs; proxies (ProxyNCA's per-example weights)."""
from . import anchor_masks, npairs, pair_lists, proxies, triplet  # importing registers them

__all__ = ["anchor_masks", "npairs", "pair_lists", "proxies", "triplet"]
