"""PML's reducers: how a loss's per-pair / per-triplet / per-element terms become a scalar.

A loss produces a *loss dict* {sub_loss_name: {"losses", "indices", "reduction_type"}}
exactly as PML does. Each sub-loss is reduced on its own by a copy of the reducer and the
results are summed (PML's MultipleReducers). `losses == 0` (a Python 0) means "no terms"
and reduces to `sum(embeddings * 0)` so the graph still reaches the embeddings.
"""
from __future__ import annotations

import copy

import torch


class BaseReducer(torch.nn.Module):
    """reduce(): `keep`, when given, is a bool mask of the terms that count (the others are
    as absent): what a loss gives instead of losses[keep], whose shape depends on the data
    and would break a torch.compile(fullgraph=True) graph. A module, as PML's reducers are
    (a loss holds its reducer as a submodule, and either kind may replace the other)."""

    def forward(self, loss_dict, embeddings, labels=None):
        """PML's call: a whole loss dict reduced, each sub-loss on its own, then summed."""
        return reduce_loss_dict(loss_dict, self, embeddings, labels)

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
        super().__init__()
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


def zero_unless(keep: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value` where the 0-d bool `keep` holds, else PML's zero loss (0, its gradient 0): as
    torch.where(keep, value, zero_loss(x)), in one product forward and one backward, where
    the select and its zero take seven small launches per call (a GPU's per-call cost). Only
    for a value that is finite when not kept (a mean whose count is clamped, over terms that
    are 0 when none counts: 0 · inf would be NaN) and in the graph of the embeddings (the
    fused ops' totals; the reducers themselves keep the select, since a caller may give them
    terms without a graph)."""
    return value * keep.to(value.dtype)


_BY_NAME = {"MeanReducer": MeanReducer, "SumReducer": SumReducer,
            "AvgNonZeroReducer": AvgNonZeroReducer, "DivisorReducer": DivisorReducer}


class ForeignReducer:
    """A reducer module of PML's that is not reimplemented here (DoNothingReducer,
    PerAnchorReducer, ClassWeightedReducer, MultipleReducers, a user's subclass): called on
    the reference backend's loss dict in PML's format, as a PML loss calls it. A dict of
    several sub-losses goes one sub-loss at a time, the values summed (PML's MultipleReducers
    around the reducer), unless the reducer is a MultipleReducers or a DoNothingReducer,
    which take the whole dict. Not a BaseReducer: the fused ops never take it (the driver
    runs such calls on the reference backend)."""

    def __init__(self, module):
        self.module = module

    def reduce_dict(self, loss_dict: dict, embeddings, labels, loss_name: str = ""):
        d = {k: _pml_entry(v, loss_name in COLUMN_LOSSES) for k, v in loss_dict.items()}
        if len(d) == 1 or takes_whole_dict(self.module):
            return self.module(d, embeddings, labels)
        total = None
        for k, v in d.items():
            value = self.module({k: v}, embeddings, labels)
            total = value if total is None else total + value
        return total

    def __repr__(self):
        return f"ForeignReducer({self.module!r})"


# PML's losses whose terms come as a column (n, 1), from its keepdim log-sum-exps: a reducer
# of PML's sees that shape (ClassWeightedReducer's product broadcasts on it)
COLUMN_LOSSES = ("MultiSimilarityLoss", "CircleLoss", "LiftedStructureLoss",
                 "GeneralizedLiftedStructureLoss")


def _pml_entry(info: dict, column: bool) -> dict:
    """One sub-loss as PML lists it: the terms a `keep` mask drops are left out (PML's loss
    never lists them), none kept under none_kept="zero" is PML's zero loss, and the terms of
    a COLUMN_LOSSES loss are a column."""
    out = {k: v for k, v in info.items() if k not in ("keep", "none_kept")}
    keep = info.get("keep")
    if column and torch.is_tensor(out["losses"]) and out["losses"].ndim == 1:
        out["losses"] = out["losses"][:, None]
        keep = None if keep is None else keep.reshape(-1, 1)
    if keep is None:
        return out
    if info.get("none_kept") == "zero" and not bool(keep.any()):
        return {"losses": 0, "indices": None, "reduction_type": "already_reduced"}
    idx = info.get("indices")
    rows = keep.reshape(-1)
    out["losses"] = out["losses"][rows]
    if isinstance(idx, (tuple, list)):
        out["indices"] = tuple(t[rows] for t in idx)
    elif torch.is_tensor(idx):
        out["indices"] = idx[rows]
    return out


def takes_whole_dict(module) -> bool:
    """PML's MultipleReducers and DoNothingReducer, or a subclass (PML tests isinstance),
    take the whole loss dict rather than one sub-loss at a time."""
    return any(c.__name__ in ("MultipleReducers", "DoNothingReducer")
               for c in type(module).__mro__)


def kept_reducer(obj):
    """The reducer a loss keeps: as PML's losses (their set_reducer), a deep copy of a
    reducer module other than MultipleReducers and DoNothingReducer, so that the calls do
    not change the user's object (ClassWeightedReducer casts its weights in place)."""
    if isinstance(obj, torch.nn.Module) and not takes_whole_dict(obj):
        return copy.deepcopy(obj)
    return obj


def as_reducer(obj, default=None):
    """Ours as is; PML's Mean/Sum/AvgNonZero/Divisor/Threshold reducers by class name as ours;
    another reducer module (PML's others, or a subclass) as a ForeignReducer; None -> default."""
    if obj is None:
        return default() if callable(default) else default
    if isinstance(obj, (BaseReducer, ForeignReducer)):
        return obj
    name = type(obj).__name__
    if name in _BY_NAME:
        return _BY_NAME[name]()
    if name == "ThresholdReducer":
        return ThresholdReducer(low=obj.low, high=obj.high)
    if isinstance(obj, torch.nn.Module):
        return ForeignReducer(obj)
    raise TypeError(f"reducer must be a reducer: one of {sorted(_BY_NAME) + ['ThresholdReducer']}"
                    f" (ours or PML's), or another of PML's reducer modules; got {name}")


def reduce_loss_dict(loss_dict: dict, reducer, embeddings: torch.Tensor, labels=None,
                     loss_name: str = ""):
    """The loss dict reduced: each sub-loss by the reducer, summed (PML's MultipleReducers);
    a ForeignReducer gets the dict in PML's format, with the batch's labels."""
    if isinstance(reducer, ForeignReducer):
        return reducer.reduce_dict(loss_dict, embeddings, labels, loss_name)
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
