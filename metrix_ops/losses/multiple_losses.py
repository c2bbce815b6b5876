"""PML's MultipleLosses: a weighted sum of losses over one batch, each with its own miner."""
from __future__ import annotations

import torch

from ..validation import is_weight

__all__ = ["MultipleLosses"]


class MultipleLosses(torch.nn.Module):
    """losses: a list, or a dict by name; miners (optional): the same kind, a miner (or None)
    per loss (a dict may name only some); weights (optional): one number per loss (a dict
    needs every name), 1 by default. forward(embeddings, labels, indices_tuple=None): Σ_k
    weight_k · loss_k(embeddings, labels, miner_k(embeddings, labels) or indices_tuple), as
    PML's; an indices_tuple is refused when miners are given."""

    def __init__(self, losses, miners=None, weights=None):
        super().__init__()
        self.is_dict = isinstance(losses, dict)
        if not self.is_dict and not isinstance(losses, (list, tuple)):
            raise TypeError(f"losses must be a list or a dict of loss modules, got "
                            f"{type(losses).__name__}")
        if len(losses) == 0:
            raise ValueError("losses is empty: give at least one loss")
        keys = list(losses) if self.is_dict else list(range(len(losses)))
        for k in keys:
            if not callable(losses[k]):
                raise TypeError(f"losses[{k!r}] must be a loss module, got "
                                f"{type(losses[k]).__name__}")
        self.losses = (torch.nn.ModuleDict(losses) if self.is_dict
                       else torch.nn.ModuleList(losses))
        self.miners = None
        # PML refuses an indices_tuple only beside a non-empty miners argument (its truth)
        self._mines = bool(miners)
        if miners is not None:
            self.miners = self._per_loss("miners", miners, keys, every=False)
            for k, m in self.miners.items():
                if m is not None and not callable(m):
                    raise TypeError(f"miners[{k!r}] must be a miner module or None, got "
                                    f"{type(m).__name__}")
            # registered, so that .to() and state_dict() see miner state, as in PML
            self._miner_modules = torch.nn.ModuleList(
                [m for m in self.miners.values() if isinstance(m, torch.nn.Module)])
        if weights is None:  # as PML: a dict of ones, or a list of ones
            weights = {k: 1 for k in keys} if self.is_dict else [1] * len(keys)
        for k, w in self._per_loss("weights", weights, keys, every=True).items():
            if not is_weight(w):
                raise ValueError(f"weights[{k!r}] must be a finite real number (or a one-element "
                                 f"tensor), got {w!r}")
        self.weights = weights  # as given, as PML keeps it
        self._keys = keys

    def _per_loss(self, arg, given, keys, every: bool) -> dict:
        if self.is_dict:
            if not isinstance(given, dict):
                raise TypeError(f"{arg} must be a dict like losses, got {type(given).__name__}")
            unknown = sorted(set(given) - set(keys))
            missing = sorted(set(keys) - set(given)) if every else []
            if unknown or missing:
                raise ValueError(f"{arg} must name the losses {sorted(keys)}: unknown "
                                 f"{unknown}, missing {missing}")
            return {k: given.get(k) for k in keys}
        if not isinstance(given, (list, tuple)) or len(given) != len(keys):
            raise ValueError(f"{arg} must be a list with one entry per loss ({len(keys)}), got "
                             f"{given!r}")
        return dict(zip(keys, given))

    def forward(self, embeddings, labels, indices_tuple=None):
        if self._mines and indices_tuple is not None:
            raise ValueError("MultipleLosses with miners mines each loss's pairs itself: "
                             "give no indices_tuple")
        total = 0
        for k in self._keys:
            miner = None if self.miners is None else self.miners[k]
            tup = miner(embeddings, labels) if miner is not None else indices_tuple
            total = total + self.losses[k](embeddings, labels, tup) * self.weights[k]
        return total

