"""Metrix (mixup with interpolated labels) at feature and input level: choose and mix
pairs, or mix inside a network with a hook. Embedding-level Metrix needs none of this:
it is `metrix=mo.Metrix(level="embedding")` on the loss."""
from .hook import mixing_hook
from .mix_pairs import mix_pairs
from .mixed_batch import MixedBatch

__all__ = ["mix_pairs", "mixing_hook", "MixedBatch"]
