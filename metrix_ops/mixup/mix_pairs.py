"""Builds the pairs to mix for feature- or input-level Metrix, where every mixed example
costs a forward pass, so their number is bounded: one partner per anchor (pair), the
hardest by default, capped at `max_pairs` (default: the batch size)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..config import METRIX_PAIRS
from ..validation import check_embeddings, check_labels
from .mixed_batch import MixedBatch


def _draw_lam(lam, alpha, generator):
    """A fixed λ, else one Beta(α, α) draw — from the caller's generator when given (torch
    has no Beta sampler that takes one, so its draw seeds a forked global RNG)."""
    if lam is not None:
        if not 0.0 <= float(lam) <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {lam}")
        return float(lam)
    a = torch.tensor(float(alpha), dtype=torch.float64)
    if generator is None:
        return float(torch.distributions.Beta(a, a).sample())
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return float(torch.distributions.Beta(a, a).sample())


def _pick(score: torch.Tensor, allowed: torch.Tensor, hardest: bool, generator) -> torch.Tensor:
    """Per row, the allowed column with the highest score (hardest), or a uniform random one."""
    if score.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=score.device)
    if hardest:
        return score.masked_fill(~allowed, float("-inf")).argmax(1)
    w = allowed.to(torch.float64)
    return torch.multinomial(w, 1, generator=generator).squeeze(1)


def _unique_pairs(src_a: torch.Tensor, src_b: torch.Tensor, b: int):
    """The distinct (src_a, src_b) pairs, in order of first appearance."""
    if len(src_a) == 0:
        return src_a, src_b
    key = src_a * b + src_b
    uniq, inverse = torch.unique(key, return_inverse=True)
    first = torch.full((len(uniq),), len(key), dtype=torch.long, device=key.device)
    first = first.scatter_reduce(0, inverse, torch.arange(len(key), device=key.device), "amin")
    first = first.sort().values
    return src_a[first], src_b[first]


def mix_pairs(h: Optional[torch.Tensor], labels: torch.Tensor, pairs: str = "pos_neg",
              lam: Optional[float] = None, alpha: float = 2.0, negatives: str = "hardest",
              max_pairs: Optional[int] = None, embeddings: Optional[torch.Tensor] = None,
              generator: Optional[torch.Generator] = None) -> MixedBatch:
    """Chooses the pairs of a batch to mix and mixes `h` (any B × ... tensor: an activation
    or the inputs; None to only choose, for `mixing_hook`). Returns a MixedBatch whose
    `inputs` is λ·h[src_a] + (1−λ)·h[src_b].

    pos_neg: for each anchor–positive pair (a, p), one negative n of a — the closest to a
        (highest cosine of `embeddings`: "hardest") or a uniformly random one — and the mix
        (p, n), label λ for a; an anchor with no positive gets (a, n) instead.
    anchor_neg: (a, n) for every anchor that has a negative, n chosen as above.
    pos_pos: (a, p) for every ordered positive pair (no negative is chosen, so `negatives`
        and `embeddings` are not used).
    neg_neg: per anchor its two hardest (or two random) distinct negatives (n, n′).
    Identical (src_a, src_b) pairs are kept once (two anchors of a class often share their
    hardest negative; each mix costs a forward pass and, in the loss, already serves every
    anchor its scheme makes it a candidate of). The first source gets weight λ. When more
    than `max_pairs` (default: B) mixes remain, `max_pairs` of them are kept, uniformly at
    random. λ: `lam` if given, else one Beta(α, α) draw (from `generator` when given).
    """
    if pairs not in METRIX_PAIRS:
        raise ValueError(f"pairs must be one of {METRIX_PAIRS}, got {pairs!r}")
    if negatives not in ("hardest", "random"):
        raise ValueError(f"negatives must be 'hardest' or 'random', got {negatives!r}")
    b = labels.shape[0] if torch.is_tensor(labels) else 0
    device = labels.device if torch.is_tensor(labels) else torch.device("cpu")
    check_labels(labels, b, device, "labels")
    if h is not None and (not torch.is_tensor(h) or h.shape[0] != b):
        raise ValueError(f"h must be a tensor with {b} rows (one per label)")
    # pos_pos mixes positives only: no negative to choose, no embeddings needed
    hardest = negatives == "hardest" and pairs != "pos_pos"
    if hardest:
        if embeddings is None:
            raise ValueError("negatives='hardest' needs embeddings= (to find the closest negative)")
        check_embeddings(embeddings, "embeddings")
        if embeddings.shape[0] != b:
            raise ValueError(f"embeddings has {embeddings.shape[0]} rows but labels has {b}")
        with torch.no_grad():
            e = F.normalize(embeddings.detach().float(), dim=1)
            score = e @ e.t()
    else:
        score = torch.zeros(b, b, device=device)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(b, dtype=torch.bool, device=device)
    pos, neg = same & ~eye, ~same

    if pairs in ("pos_neg", "pos_pos"):
        a, p = torch.where(pos)
        if pairs == "pos_pos":
            src_a, src_b = a, p
        else:
            has_neg = neg[a].any(1)
            a, p = a[has_neg], p[has_neg]
            n = _pick(score[a], neg[a], hardest, generator)
            lonely = torch.where(~pos.any(1) & neg.any(1))[0]  # anchors without a positive
            n_lonely = _pick(score[lonely], neg[lonely], hardest, generator)
            src_a, src_b = torch.cat([p, lonely]), torch.cat([n, n_lonely])
    elif pairs == "anchor_neg":
        a = torch.where(neg.any(1))[0]
        src_a, src_b = a, _pick(score[a], neg[a], hardest, generator)
    else:  # neg_neg
        a = torch.where(neg.sum(1) >= 2)[0]
        first = _pick(score[a], neg[a], hardest, generator)
        rest = neg[a].clone()
        rest[torch.arange(len(a), device=device), first] = False
        src_a, src_b = first, _pick(score[a], rest, hardest, generator)

    cap = b if max_pairs is None else int(max_pairs)
    if cap < 1:
        raise ValueError(f"max_pairs must be >= 1, got {max_pairs}")
    src_a, src_b = _unique_pairs(src_a, src_b, b)
    if len(src_a) > cap:
        keep = torch.randperm(len(src_a), generator=generator, device="cpu")[:cap].to(device)
        src_a, src_b = src_a[keep], src_b[keep]
    mixed = MixedBatch(src_a, src_b, _draw_lam(lam, alpha, generator), pairs,
                       labels[src_a], labels[src_b])
    if h is not None:
        mixed.inputs = mixed.mix(h)
    return mixed
