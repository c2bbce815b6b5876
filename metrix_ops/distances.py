"""Distances with PML's semantics (normalize_embeddings, p, power, is_inverted).

The reference losses compute their B×M matrix through these; the fused backends
support the normalised cases (cosine similarity, L2 distance) and fall back otherwise.
A PML distance object is accepted wherever one of ours is (see `as_distance`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .records import Records, lazy_stat


# PML's statistics of a distance call (BaseDistance.record_norms)
NORM_STATS = ["initial_avg_query_norm", "initial_avg_ref_norm", "final_avg_query_norm",
              "final_avg_ref_norm"]


def wants_norms(distance) -> bool:
    """Whether `distance` keeps PML's norm statistics of its calls (collect_stats; never
    inside torch.compile, where nothing is recorded)."""
    return bool(getattr(distance, "collect_stats", False)) and not torch.compiler.is_compiling()


def record_norms(distance, query: torch.Tensor, ref: torch.Tensor | None = None,
                 when=True) -> None:
    """The statistics `distance` (ours, or a PML distance kept as given) records of a call on
    (query, ref), where the fused ops compute without calling it; `when`: whether the call is
    made (a 0-d bool tensor: the previous values kept where False, without a host read)."""
    if not wants_norms(distance) or when is False:
        return
    if isinstance(distance, BaseDistance):
        distance.record_norms(query, ref, when)
    elif hasattr(distance, "set_default_stats") and bool(when):  # PML's (its own .item() reads)
        ref = query if ref is None else ref
        with torch.no_grad():
            distance.set_default_stats(query, ref, distance.maybe_normalize(query),
                                       distance.maybe_normalize(ref))


class BaseDistance(Records, torch.nn.Module):
    """A module, as PML's distances are (so they sit in a loss's module tree and take hooks);
    holds no parameters."""
    is_inverted = False  # True for similarities: larger means closer

    def __init__(self, normalize_embeddings: bool = True, p: float = 2, power: float = 1,
                 collect_stats: bool = False):
        super().__init__()
        self.normalize_embeddings = normalize_embeddings
        self.p = p
        self.power = power
        self.collect_stats = collect_stats
        self.add_to_recordable_attributes(list_of_names=["p", "power"])
        self.add_to_recordable_attributes(list_of_names=NORM_STATS, is_stat=True)

    def forward(self, query: torch.Tensor, ref: torch.Tensor | None = None) -> torch.Tensor:
        """The query × ref matrix (query × query without ref), as PML's distance call."""
        if ref is not None and ref.shape[1:] != query.shape[1:]:
            raise ValueError(f"ref must have the query's embedding size {query.shape[1]}, got "
                             f"shape {tuple(ref.shape)}")
        q = self.maybe_normalize(query)
        r = q if ref is None else self.maybe_normalize(ref)
        self.record_norms(query, ref)
        mat = self.compute_mat(q, r)
        return mat**self.power if self.power != 1 else mat

    def record_norms(self, query: torch.Tensor, ref: torch.Tensor | None = None,
                     when=True) -> None:
        """PML's statistics of a distance call (with collect_stats): the mean norm (in p) of
        the query and the reference rows before and after normalising. Kept on the device and
        read on first access (one host sync then, none in the call); not under
        torch.compile. `when` a 0-d bool tensor: the previous values where it is False."""
        if not wants_norms(self):
            return
        ref = query if ref is None else ref
        with torch.no_grad():
            means = [self.get_norm(t).mean() for t in (query, ref)]
            means += [self.get_norm(self.maybe_normalize(t)).mean() for t in (query, ref)]
            new = torch.stack([m.double() for m in means])
            if torch.is_tensor(when):
                new = torch.where(when.to(new.device), new, self._held_norms(new))
            self.__dict__["_norm_stats"] = new

    def _held_norms(self, like: torch.Tensor) -> torch.Tensor:
        """The statistics held now as a tensor like `like`, without reading a device value."""
        held = self.__dict__.get("_norm_stats", (0, 0, 0, 0))
        if torch.is_tensor(held):
            return held.to(like)
        return torch.stack([v.reshape(()).to(like) if torch.is_tensor(v)
                            else like.new_tensor(float(v)) for v in held])

    initial_avg_query_norm = lazy_stat("_norm_stats", 0, 4)
    initial_avg_ref_norm = lazy_stat("_norm_stats", 1, 4)
    final_avg_query_norm = lazy_stat("_norm_stats", 2, 4)
    final_avg_ref_norm = lazy_stat("_norm_stats", 3, 4)

    def settings(self) -> tuple:
        return (type(self), self.normalize_embeddings, self.p, self.power)

    def normalize(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return F.normalize(x, p=self.p, dim=dim)

    def maybe_normalize(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return self.normalize(x, dim) if self.normalize_embeddings else x

    def get_norm(self, x: torch.Tensor, dim: int = 1, **kwargs) -> torch.Tensor:
        return torch.linalg.vector_norm(x, ord=self.p, dim=dim, **kwargs)

    def compute_mat(self, q, r):
        raise NotImplementedError

    def pairwise_distance(self, q, r):
        raise NotImplementedError

    # `margin(x, y)` is how much x exceeds y in the "farther" direction, as PML defines it.
    def margin(self, x, y):
        return y - x if self.is_inverted else x - y

    def smallest_dist(self, *args, **kwargs):
        return torch.max(*args, **kwargs) if self.is_inverted else torch.min(*args, **kwargs)

    def largest_dist(self, *args, **kwargs):
        return torch.min(*args, **kwargs) if self.is_inverted else torch.max(*args, **kwargs)

    def extra_repr(self):
        return f"normalize_embeddings={self.normalize_embeddings}, p={self.p}, power={self.power}"


class LpDistance(BaseDistance):
    def compute_mat(self, q, r):
        if q.dtype in (torch.float16, torch.bfloat16):
            # cdist has no half kernels on every device; accumulate in fp32 as the design asks.
            return torch.cdist(q.float(), r.float(), p=self.p).to(q.dtype)
        return torch.cdist(q, r, p=self.p)

    def pairwise_distance(self, q, r):
        return F.pairwise_distance(q, r, p=self.p)


class CosineSimilarity(BaseDistance):
    is_inverted = True

    def __init__(self, **kwargs):
        kwargs.setdefault("normalize_embeddings", True)
        super().__init__(**kwargs)

    def compute_mat(self, q, r):
        return q @ r.t()

    def pairwise_distance(self, q, r):
        return (q * r).sum(dim=1)


class DotProductSimilarity(CosineSimilarity):
    """As in PML, it still normalises by default (normalize_embeddings=True)."""


_BY_NAME = {"LpDistance": LpDistance, "CosineSimilarity": CosineSimilarity,
            "DotProductSimilarity": DotProductSimilarity}


_DISTANCE_API = ("compute_mat", "maybe_normalize", "margin", "is_inverted", "power")


def as_distance(obj, default=None):
    """Ours as is; PML's LpDistance, CosineSimilarity and DotProductSimilarity converted by
    class name and settings; another distance of PML's API (SNRDistance, a subclass of one of
    PML's) as it is: the fused ops do not cover it (their checks are by our types), so the
    reference computes with it, as PML would; None -> default."""
    if obj is None:
        return default() if callable(default) else default
    if isinstance(obj, BaseDistance):
        return obj
    cls = _BY_NAME.get(type(obj).__name__)
    if cls is not None:
        return cls(normalize_embeddings=obj.normalize_embeddings, p=obj.p, power=obj.power)
    if callable(obj) and all(hasattr(obj, a) for a in _DISTANCE_API):
        return obj
    raise TypeError(f"distance must be a distance: one of {sorted(_BY_NAME)} (ours or PML's), "
                    f"or an object with PML's distance API ({', '.join(_DISTANCE_API)}); got "
                    f"{type(obj).__name__}")


def is_normalized_l2(d: BaseDistance) -> bool:
    return type(d) is LpDistance and d.normalize_embeddings and d.p == 2 and d.power == 1


def is_normalized_sq_l2(d: BaseDistance) -> bool:
    """Squared L2 of unit rows (FaceNet's triplet distance): 2 − 2s of their cosine s, so a
    loss whose terms are hinges of it is 2× the cosine loss with halved margins."""
    return type(d) is LpDistance and d.normalize_embeddings and d.p == 2 and d.power == 2


def unit_l2_form(d: BaseDistance) -> bool:
    """An L2 of normalised rows, which the fused ops compute from the rows' cosine s as
    √(2 − 2s) or 2 − 2s: exact for unit rows, not for a zero row (normalised to zero)."""
    return is_normalized_l2(d) or is_normalized_sq_l2(d)


def is_raw_l2(d: BaseDistance) -> bool:
    """L2 or squared L2 of the rows as they are (no normalising): fused/raw_l2.py."""
    return (type(d) is LpDistance and not d.normalize_embeddings and d.p == 2
            and d.power in (1, 2))


def is_squared_l2(d: BaseDistance) -> bool:
    """Squared L2 of unit or raw rows: 2 − 2s of the unit rows' product s (of raw rows,
    2 − 2s̃ with s̃ = 1 − d²/2, fused/raw_l2.py), which the ops take as a cosine loss at halved
    margins, terms doubled."""
    return is_normalized_sq_l2(d) or (is_raw_l2(d) and d.power == 2)


# torch.cdist's p = 2 takes row differences directly when both sides have at most this many
# rows, and the Gram form ‖x‖² + ‖y‖² − 2x·y (ATen's use_mm_for_euclid_dist_if_necessary) past it
CDIST_DIRECT_ROWS = 25


def cdist_is_direct(n_query: int, n_ref: int) -> bool:
    """Whether PML's LpDistance (torch.cdist, p = 2) computes exact differences for a call of
    n_query × n_ref rows. Then two rows closer than ~1e-3 get their true distance; the fused
    ops' √(2 − 2s) (like cdist's Gram form) cannot resolve it from a cosine s rounded near 1."""
    return n_query <= CDIST_DIRECT_ROWS and n_ref <= CDIST_DIRECT_ROWS


def is_dot_of_normalized(d: BaseDistance) -> bool:
    """A CosineSimilarity of any p: the dot product of rows the distance normalises itself
    (`d.maybe_normalize`); ops that normalise through the distance take every p."""
    return type(d) is CosineSimilarity and d.normalize_embeddings and d.power == 1


def is_cosine(d: BaseDistance) -> bool:
    """The plain cosine similarity of L2-normalised rows (what the fused ops compute); PML's
    CosineSimilarity(p=1) normalises by the L1 norm, which is another similarity."""
    return (type(d) is CosineSimilarity and d.normalize_embeddings and d.p == 2
            and d.power == 1)
