"""PML's regularizers, and the regularization sub-losses every loss takes as PML's do:
`embedding_regularizer=` / `embedding_reg_weight=` on every loss, and `weight_regularizer=` /
`weight_reg_weight=` on the proxy losses (the proxies are the weights).

A regularizer maps a 2-D tensor (embeddings, or proxies) to a scalar: per-row terms reduced by
its own reducer (MeanReducer by default), as PML's BaseRegularizer. PML adds
`weight · regularizer(x)` to the loss as an "already reduced" sub-loss, so it is a plain sum
here too, outside the fused ops: O(B·D) (O(C²) for RegularFace over C proxies), never B×M.
PML's regularizer objects are accepted as they are (any module x -> scalar tensor).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .distances import CosineSimilarity, LpDistance, as_distance, is_cosine
from .reducers import MeanReducer, as_reducer, reduce_loss_dict
from .validation import is_weight


class BaseRegularizer(torch.nn.Module):
    """compute_loss(x) gives a loss dict of per-row ("element") terms; forward reduces it with
    the regularizer's reducer. Half inputs are computed in fp32, as the losses are."""

    default_distance = LpDistance  # PML's (a regularizer module with records and distance)

    def __init__(self, reducer=None, distance=None, collect_stats: bool = False):
        super().__init__()
        self.reducer = as_reducer(reducer, MeanReducer)
        # PML's options, taken for drop-in construction (only some regularizers use a
        # distance; PML's per-call statistics are not recorded)
        self.distance = as_distance(distance, self.default_distance)
        self.collect_stats = collect_stats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(x) or x.ndim != 2 or not x.is_floating_point():
            raise ValueError(f"{type(self).__name__} takes a 2-D floating-point tensor "
                             f"(rows × dim), got {_describe(x)}")
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        return reduce_loss_dict(self.compute_loss(x), self.reducer, x,
                                torch.arange(len(x), device=x.device))  # PML's labels here

    def compute_loss(self, x: torch.Tensor) -> dict:
        raise NotImplementedError


def _element(losses: torch.Tensor) -> dict:
    # PML's indices: the rows (a reducer of PML's may read them)
    return {"loss": {"losses": losses, "indices": torch.arange(len(losses), device=losses.device),
                     "reduction_type": "element"}}


class LpRegularizer(BaseRegularizer):
    """‖x_i‖_p^power per row (PML's default: the L2 norm; the N-pair paper's L2 penalty is
    p=2, power=2)."""

    def __init__(self, p: float = 2, power: float = 1, reducer=None, **kwargs):
        super().__init__(reducer, **kwargs)
        self.p, self.power = p, power

    def compute_loss(self, x):
        reg = torch.linalg.vector_norm(x, ord=self.p, dim=1)
        return _element(reg**self.power if self.power != 1 else reg)

    def extra_repr(self):
        return f"p={self.p}, power={self.power}"


class ZeroMeanRegularizer(BaseRegularizer):
    """|Σ_d x_id| per row."""

    def compute_loss(self, x):
        return _element(x.sum(dim=1).abs())


class CenterInvariantRegularizer(BaseRegularizer):
    """(‖w_i‖² − mean_j ‖w_j‖²)² / 4 per row (CenterInvariant loss, for proxies/weights), the
    norm the distance's: an LpDistance(power=1, normalize_embeddings=False) of any p, as PML."""

    def __init__(self, reducer=None, distance=None, **kwargs):
        super().__init__(reducer, distance, **kwargs)
        d = self.distance
        if not (type(d) is LpDistance and d.power == 1 and not d.normalize_embeddings):
            raise ValueError(f"CenterInvariantRegularizer: distance must be an LpDistance with "
                             f"power=1 and normalize_embeddings=False, got {d!r}")

    @staticmethod
    def default_distance():
        return LpDistance(power=1, normalize_embeddings=False)

    def compute_loss(self, w):
        sq = self.distance.get_norm(w) ** 2
        return _element((sq - sq.mean()) ** 2 / 4)


class RegularFaceRegularizer(BaseRegularizer):
    """Per row, its cosine with its most similar other row (RegularFace's exclusive
    regularization, for proxies/weights); the nearest row is picked without gradient, as in
    PML (a single row is its own nearest: the term is 1). `distance`: cosine similarity only
    (PML asserts an inverted distance; cosine is its default and the paper's)."""

    default_distance = CosineSimilarity

    def __init__(self, distance=None, reducer=None, **kwargs):
        super().__init__(reducer, distance, **kwargs)
        if not is_cosine(self.distance):
            raise ValueError(f"RegularFaceRegularizer: distance must be the cosine similarity "
                             f"(CosineSimilarity()), got {self.distance!r}")

    def compute_loss(self, w):
        wn = F.normalize(w, dim=1)
        cos = wn @ wn.t()
        with torch.no_grad():
            others = cos.clone()
            others.fill_diagonal_(-math.inf)
            nearest = others.max(dim=1).indices
        return _element(cos.gather(1, nearest[:, None]).squeeze(1))


def _describe(x) -> str:
    if not torch.is_tensor(x):
        return type(x).__name__
    return f"a {x.ndim}-D {x.dtype} tensor of shape {tuple(x.shape)}"


def check_regularizer(name: str, regularizer, weight) -> None:
    """`name` (embedding_regularizer or weight_regularizer) is None or a callable module, and
    its weight a finite real number: caught when the loss is built, not in the first step."""
    if regularizer is not None and not callable(regularizer):
        raise TypeError(f"{name} must be a regularizer module (metrix_ops.regularizers' or "
                        f"PML's) or None, got {type(regularizer).__name__}")
    reg_weight = name.replace("regularizer", "reg_weight")
    if not is_weight(weight):
        raise ValueError(f"{reg_weight} must be a finite real number (or a one-element tensor), "
                         f"got {weight!r}")


def _term(name: str, regularizer, x: torch.Tensor, weight) -> torch.Tensor:
    value = regularizer(x)
    if not torch.is_tensor(value) or value.numel() != 1:
        raise ValueError(f"{name} must return a scalar tensor (a reduced loss), got "
                         f"{_describe(value)}")
    if torch.is_tensor(weight):  # a one-element tensor: PML's scalar slot, the loss's dtype
        weight = weight.reshape(()).to(value)
    return value.reshape(()) * weight


def regularization(loss: torch.Tensor, embeddings: torch.Tensor, proxies=None, *,
                   embedding_regularizer=None, embedding_reg_weight=1,
                   weight_regularizer=None, weight_reg_weight=1) -> torch.Tensor:
    """loss plus PML's regularization sub-losses: weight_reg_weight · R_w(proxies) and
    embedding_reg_weight · R_e(embeddings), on the embeddings as the loss received them
    (before any normalisation). An empty batch has nothing to regularize: its embedding term
    is 0 (PML's mean over no rows is NaN); the proxies' term is there for any batch, as PML's."""
    if weight_regularizer is not None:  # (run_loss has checked that the loss has proxies)
        loss = _add(loss, "weight_reg_loss",
                    _term("weight_regularizer", weight_regularizer, proxies, weight_reg_weight))
    if embedding_regularizer is not None and embeddings.shape[0] > 0:
        x = embeddings.float() if embeddings.dtype in (torch.float16, torch.bfloat16) else embeddings
        loss = _add(loss, "embedding_reg_loss", _term("embedding_regularizer",
                                                      embedding_regularizer, x,
                                                      embedding_reg_weight))
    return loss


def _add(loss, name: str, value):
    """loss + value; or, where a reducer returned the loss dict (PML's DoNothingReducer), the
    dict with the term as PML lists it."""
    if isinstance(loss, dict):
        return {**loss, name: {"losses": value, "indices": None,
                               "reduction_type": "already_reduced"}}
    return loss + value


def module_options(loss_module) -> dict:
    """A loss module's regularization options, as `regularization` takes them (for the
    wrappers that call the loss's op directly: CrossBatchMemory, DistributedLossWrapper)."""
    return {k: getattr(loss_module, k, d) for k, d in
            (("embedding_regularizer", None), ("embedding_reg_weight", 1),
             ("weight_regularizer", None), ("weight_reg_weight", 1))}
