"""PML's reducers: how a loss's per-pair / per-triplet / per-element terms become a scalar.

A loss produces a *loss dict* {sub_loss_name: {"losses", "indices", "reduction_type"}}
exactly as PML does. Each sub-loss is reduced on its own by a copy of the reducer and the
results are summed (PML's MultipleReducers). `losses == 0` (a Python 0) means "no terms"
and reduces to `sum(embeddings * 0)` so the graph still reaches the embeddings.
"""
from __future__ import annotations

import torch


class BaseReducer:
    """reduce(): `keep`, when given, is a bool mask of the terms that count (the others are
    as absent): what a loss gives instead of losses[keep], whose shape depends on the data
    and would break a torch.compile(fullgraph=True) graph."""

    def reduce(self, losses, reduction_type: str, embeddings: torch.Tensor,
               divisor=None, keep=None) -> torch.Tensor:
        if not torch.is_tensor(losses):
            if losses == 0:
                return zero_loss(embeddings)
            raise TypeError(f"losses must be a tensor or 0, got {type(losses).__name__}")
        if reduction_type == "already_reduced":
            return losses.reshape(())
        return self.reduce_terms(losses, embeddings, keep)

    def reduce_terms(self, losses, embeddings, keep=None):
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}()"


class DivisorReducer(BaseReducer):
    """Sum of the terms over a divisor the loss supplies (ProxyAnchor: the number of
    proxies with positives for the positive sub-loss, all proxies for the negative one)."""

    def reduce(self, losses, reduction_type, embeddings, divisor=None, keep=None):
        if torch.is_tensor(losses) and reduction_type != "already_reduced":
            if divisor is None:
                raise ValueError("DivisorReducer needs the loss to give a divisor")
            total = _kept_sum(losses, keep)
            if torch.is_tensor(divisor):  # a count left on the device: a select, no sync
                return torch.where(divisor > 0, total / divisor.clamp_min(1),
                                   zero_loss(embeddings))
            if divisor == 0:
                return zero_loss(embeddings)
            return total / divisor
        return super().reduce(losses, reduction_type, embeddings)


class MeanReducer(BaseReducer):
    def reduce_terms(self, losses, embeddings, keep=None):
        if keep is None:
            return losses.mean()  # an empty tensor gives NaN, as in PML
        return _kept_sum(losses, keep) / keep.sum()  # none kept: 0/0, NaN as the mean of none


class SumReducer(BaseReducer):
    def reduce_terms(self, losses, embeddings, keep=None):
        return _kept_sum(losses, keep)


class ThresholdReducer(BaseReducer):
    """Mean of the terms with low < term < high; zero (with graph) if none passes."""

    def __init__(self, low=None, high=None):
        if low is None and high is None:
            raise ValueError("ThresholdReducer needs low or high")
        self.low, self.high = low, high

    def reduce_terms(self, losses, embeddings, keep=None):
        # masks and a select rather than losses[losses > low]: no data-dependent shape, so
        # the reduction traces whole under torch.compile(fullgraph=True)
        keep = torch.ones_like(losses, dtype=torch.bool) if keep is None else keep
        if self.low is not None:
            keep = keep & (losses > self.low)
        if self.high is not None:
            keep = keep & (losses < self.high)
        n = keep.sum()
        total = _kept_sum(losses, keep)
        return torch.where(n >= 1, total / n.clamp_min(1), zero_loss(embeddings))

    def __repr__(self):
        return f"{type(self).__name__}(low={self.low}, high={self.high})"


class AvgNonZeroReducer(ThresholdReducer):
    def __init__(self):
        super().__init__(low=0)

    def __repr__(self):
        return "AvgNonZeroReducer()"


def _kept_sum(losses, keep):
    """Σ losses over the kept terms (all when keep is None); a select, so a NaN or Inf term
    that is not kept reaches neither the value nor the gradient."""
    if keep is None:
        return losses.sum()
    return torch.where(keep, losses, torch.zeros_like(losses)).sum()


def zero_loss(embeddings: torch.Tensor) -> torch.Tensor:
    return torch.sum(embeddings * 0)


_BY_NAME = {"MeanReducer": MeanReducer, "SumReducer": SumReducer,
            "AvgNonZeroReducer": AvgNonZeroReducer, "DivisorReducer": DivisorReducer}


def as_reducer(obj, default=None) -> BaseReducer:
    """Ours as is; PML's Mean/Sum/AvgNonZero/Threshold reducers by class name; None -> default."""
    if obj is None:
        return default() if callable(default) else default
    if isinstance(obj, BaseReducer):
        return obj
    name = type(obj).__name__
    if name in _BY_NAME:
        return _BY_NAME[name]()
    if name == "ThresholdReducer":
        return ThresholdReducer(low=obj.low, high=obj.high)
    raise TypeError(f"reducer must be one of {sorted(_BY_NAME) + ['ThresholdReducer']} "
                    f"(ours or PML's), got {name}")


def reduce_loss_dict(loss_dict: dict, reducer: BaseReducer, embeddings: torch.Tensor) -> torch.Tensor:
    total = None
    for info in loss_dict.values():
        keep = info.get("keep")
        value = reducer.reduce(info["losses"], info["reduction_type"], embeddings,
                               divisor=info.get("divisor"), keep=keep)
        if keep is not None and info.get("none_kept") == "zero":
            # as a loss dict with no terms (losses 0), without a data-dependent branch
            value = torch.where(keep.any(), value, zero_loss(embeddings))
        total = value if total is None else total + value
    return total if total is not None else zero_loss(embeddings)
