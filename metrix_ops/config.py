"""User-facing option objects: `mo.Metrix(...)` and `mo.Expansion(...)`.

They only hold and validate settings; the math lives in reference/ (and later in the
fused backends). Frozen dataclasses so a loss module's options cannot drift mid-run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

METRIX_LEVELS = ("embedding", "feature", "input")
METRIX_PAIRS = ("pos_neg", "anchor_neg", "pos_pos", "neg_neg")
EXPANSION_PAIRS = ("all", "adjacent")


@dataclass(frozen=True)
class Metrix:
    """Metrix: mixup with interpolated labels (ICLR 2022).

    level: where to mix: "embedding" (closed form inside the loss), "feature" or "input"
        (helpers in `metrix_ops.mixup` build the mixed batch; the loss then takes
        `mixed_embeddings=` and `mixed=`).
    pairs: which pairs are mixed ("pos_neg" is the paper's default).
    alpha: λ ~ Beta(alpha, alpha), one draw per call unless `lam` is fixed.
    weight: the total loss is L(clean) + weight * L(mixed).
    lam: a fixed λ in [0, 1] for reproducibility (a call's `lam=` overrides it).
    negatives: for feature/input mixing, which negative goes with an anchor–positive
        pair: "hardest" (closest) or "random".
    max_pairs: cap on the number of mixed examples built for feature/input mixing.
    """

    level: str = "embedding"
    pairs: str = "pos_neg"
    alpha: float = 2.0
    weight: float = 0.4
    lam: Optional[float] = None
    negatives: str = "hardest"
    max_pairs: Optional[int] = None

    def __post_init__(self):
        if self.level not in METRIX_LEVELS:
            raise ValueError(f"Metrix level must be one of {METRIX_LEVELS}, got {self.level!r}")
        if self.pairs not in METRIX_PAIRS:
            raise ValueError(f"Metrix pairs must be one of {METRIX_PAIRS}, got {self.pairs!r}")
        if not self.alpha > 0:
            raise ValueError(f"Metrix alpha must be > 0, got {self.alpha!r}")
        if not self.weight >= 0:
            raise ValueError(f"Metrix weight must be >= 0, got {self.weight!r}")
        if self.lam is not None and not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"Metrix lam must be in [0, 1], got {self.lam!r}")
        if self.negatives not in ("hardest", "random"):
            raise ValueError(f"Metrix negatives must be 'hardest' or 'random', got {self.negatives!r}")
        if self.max_pairs is not None and self.max_pairs < 1:
            raise ValueError(f"Metrix max_pairs must be >= 1 or None, got {self.max_pairs!r}")


@dataclass(frozen=True)
class Expansion:
    """Embedding Expansion (CVPR 2020): n synthetic points on each positive segment.

    n_points: synthetic points per positive pair (0 means none: the clean loss).
    pairs: "all" positive pairs, or "adjacent" (rows 2t and 2t+1, the official code's
        pairing, which needs class-contiguous batches: a non-positive pair raises).
    normalize: L2-normalise the synthetic points (the paper shows this matters).
    """

    n_points: int = 2
    pairs: str = "all"
    normalize: bool = True

    def __post_init__(self):
        if not isinstance(self.n_points, int) or self.n_points < 0:
            raise ValueError(f"Expansion n_points must be an int >= 0, got {self.n_points!r}")
        if self.pairs not in EXPANSION_PAIRS:
            raise ValueError(f"Expansion pairs must be one of {EXPANSION_PAIRS}, got {self.pairs!r}")
