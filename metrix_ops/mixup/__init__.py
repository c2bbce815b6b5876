"""Metrix (mixup with interpolated labels) at feature and input level: choose and mix
pairs (`mix_pairs` -> `MixedBatch`), or mix inside an unmodified network with a forward
hook (`mixing_hook`). Embedding-level Metrix needs none of this: it is
`metrix=mo.Metrix(level="embedding")` on the loss."""
from .feature_hook import mixing_hook
from .mix_pairs import mix_pairs
from .mixed_batch import MixedBatch

__all__ = ["mix_pairs", "mixing_hook", "MixedBatch"]
