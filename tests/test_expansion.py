"""Embedding Expansion (reference) against an independent implementation of the official
algorithm: every synthetic point materialised as an embedding (generated as the official
`get_embedding_aug`: one concatenated block per k), the dense distance / cosine matrix
over all B + n·#segments points, and the hard-negative-pair rule and each loss by explicit
per-anchor loops. Nothing from metrix_ops.reference is imported here."""
import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import distances as pml_dist
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu
from torch.utils._python_dispatch import TorchDispatchMode

import metrix_ops as mo
from cases import CASE_IDS, CASES, assert_close_vg, make_case

NAMES = ["HPHNTripletLoss", "LiftedStructureLoss", "MultiSimilarityLoss", "NPairsLoss",
         "TripletMarginLoss", "GeneralizedLiftedStructureLoss"]
HP = {"HPHNTripletLoss": {"margin": 0.3}, "TripletMarginLoss": {"margin": 0.1},
      "MultiSimilarityLoss": {"alpha": 3.0, "beta": 40.0, "base": 0.4},
      "LiftedStructureLoss": {"neg_margin": 0.8, "pos_margin": 0.1}, "NPairsLoss": {},
      "GeneralizedLiftedStructureLoss": {"neg_margin": 0.9, "pos_margin": 0.2}}


pytestmark = pytest.mark.usefixtures("one_thread")


# (n_points, normalize) per batch: n ∈ {0, 1, 2, 5}, normalisation on and off
GRID = [(0, True), (1, True), (1, False), (2, True), (2, False), (5, True), (5, False)]


# ---------------------------------------------------------------- the official algorithm
def segments(y, pairs):
    b = len(y)
    if pairs == "adjacent":
        return [(t, t + 1) for t in range(0, b, 2)]
    return [(i, j) for i in range(b) for j in range(i + 1, b) if y[i] == y[j]]


def materialise(x, y, n, pairs, normalize):
    """All points as rows: originals, then for k = 1..n the block of x̄_k of every segment."""
    xh = F.normalize(x, dim=1)
    segs = segments(y, pairs)
    rows, labels, ends = [xh], [int(c) for c in y], [{i} for i in range(len(x))]
    if segs:
        i, j = (torch.tensor(t) for t in zip(*segs))
        for k in range(1, n + 1):
            v = (k * xh[i] + (n + 1 - k) * xh[j]) / (n + 1)
            rows.append(F.normalize(v, dim=1) if normalize else v)
            labels += [int(y[a]) for a, _ in segs]
            ends += [{a, c} for a, c in segs]
    return torch.cat(rows), labels, ends


def dense_metric(V, distance):
    """The loss metric between every two materialised points (cdist's convention at
    coincident points: zero distance, zero subgradient)."""
    if distance is not None and distance.is_inverted:
        Vn = F.normalize(V, dim=1)
        return Vn @ Vn.t()
    d2 = ((V[:, None, :] - V[None, :, :]) ** 2).sum(-1)
    coincident = d2 < 1e-24
    D = torch.where(coincident, torch.zeros_like(d2), d2.clamp_min(1e-300).sqrt())
    return D if distance is None or distance.power == 1 else D**distance.power


DEFAULT_DIST = {"MultiSimilarityLoss": pml_dist.CosineSimilarity(),
                "NPairsLoss": pml_dist.DotProductSimilarity()}


def official(name, x, y, n, pairs, normalize, hp, distance=None):
    """The loss by explicit loops over the materialised points; `distance` None is the
    loss's default (L2, or cosine for MS and N-pairs)."""
    distance = distance or DEFAULT_DIST.get(name)
    inverted = distance is not None and distance.is_inverted
    V, labels, ends = materialise(x, y, n, pairs, normalize)
    M = dense_metric(V, distance)
    b, zero = len(x), (x * 0).sum()
    closest = (lambda t, dim: t.max(dim).values) if inverted else (lambda t, dim: t.min(dim).values)
    far = (lambda a, p: a - p) if inverted else (lambda a, p: p - a)  # how much p is farther
    P = [[p for p in range(b) if p != i and y[p] == y[i]] for i in range(b)]
    Q = [[q for q in range(len(labels)) if labels[q] != int(y[i])] for i in range(b)]
    A = [[a for a in range(len(labels)) if i in ends[a]] for i in range(b)]
    # the hard-negative-pair rule: each negative point's closest pair with i's side
    dhat = [closest(M[A[i]][:, Q[i]], 0) if Q[i] else None for i in range(b)]

    if name == "HPHNTripletLoss":
        terms = []
        for i in range(b):
            if P[i] and Q[i]:
                hardest_pos = M[i, P[i]].min() if inverted else M[i, P[i]].max()
                terms.append(torch.relu(far(closest(dhat[i], 0), hardest_pos) + hp["margin"]))
        return torch.stack(terms).mean() if terms else zero
    if name == "TripletMarginLoss":
        terms = [far(dhat[i][None, :], M[i, P[i]][:, None]).flatten() + hp["margin"]
                 for i in range(b) if P[i] and Q[i]]
        if not terms:
            return zero
        t = torch.cat(terms)
        t = F.softplus(t) if hp.get("smooth_loss") else torch.relu(t)
        return t[t > 0].mean() if (t > 0).any() else zero
    if name == "MultiSimilarityLoss":
        al, be, base = hp["alpha"], hp["beta"], hp["base"]
        out = []
        for i in range(b):
            # similarities: e^{−α(s−base)}, e^{β(ŝ−base)}; distances flip the signs (PML)
            sp = sn = zero
            if P[i]:
                s = M[i, P[i]]
                sp = torch.exp(al * (base - s) if inverted else al * (s - base)).sum()
            if Q[i]:
                sn = torch.exp(be * (dhat[i] - base) if inverted else be * (base - dhat[i])).sum()
            out.append(torch.log1p(sp) / al + torch.log1p(sn) / be)
        return torch.stack(out).mean() if b > 1 else zero
    if name == "LiftedStructureLoss":
        if not any(P) or not any(Q):
            return zero
        sgn = 1 if inverted else -1
        terms = []
        for a in range(b):
            for p in P[a]:
                negs = torch.cat([sgn * dhat[k] - sgn * hp["neg_margin"] for k in (a, p)])
                pos = M[a, p] - hp["pos_margin"] if not inverted else hp["pos_margin"] - M[a, p]
                terms.append(torch.relu(torch.logsumexp(negs, 0) + pos) ** 2 / 2)
        return torch.stack(terms).mean()
    if name == "GeneralizedLiftedStructureLoss":
        if not any(P) and not any(Q):
            return zero
        sgn = 1 if inverted else -1
        out = []
        for i in range(b):
            # each side: log Σ e^{·}, or 0 when the side is empty (PML's masked form)
            pos = torch.logsumexp(sgn * (hp["pos_margin"] - M[i, P[i]]), 0) if P[i] else zero
            neg = torch.logsumexp(sgn * (dhat[i] - hp["neg_margin"]), 0) if Q[i] else zero
            out.append(torch.relu(pos + neg))
        return torch.stack(out).mean()
    # NPairsLoss: PML's one pair per label; negative logits over the other pairs' positives
    # and every synthetic point of another class, each by its closest pair
    a_idx, p_idx = lmu.convert_to_pos_pairs_with_unique_labels(None, y)
    if len(a_idx) == 0:
        return zero
    sgn = 1 if inverted else -1
    losses = []
    for k, (a, p) in enumerate(zip(a_idx.tolist(), p_idx.tolist())):
        neg_of = {q: t for t, q in enumerate(Q[a])}
        logits = [sgn * M[a, p] if l == k else sgn * dhat[a][neg_of[pl]]
                  for l, pl in enumerate(p_idx.tolist())]
        logits += [sgn * dhat[a][t] for t, q in enumerate(Q[a]) if q >= b]
        losses.append(-torch.log_softmax(torch.stack(logits), 0)[k])
    return torch.stack(losses).mean()


# ---------------------------------------------------------------- helpers
def ours(name, n, pairs, normalize, hp=None, **kw):
    hp = HP[name] if hp is None else hp
    return getattr(mo.losses, name)(backend="reference", **hp, **kw,
                                    expansion=mo.Expansion(n_points=n, pairs=pairs, normalize=normalize))


def adjacent_batch(case, seed):
    """The case made class-contiguous in pairs: y[2t+1] = y[2t], even batch size."""
    x, y = make_case(case, seed=seed)
    b = len(y) - len(y) % 2
    y = y[:b].clone()
    y[1::2] = y[0::2]
    return x[:b].detach().clone().requires_grad_(True), y


def assert_close_up_to_ties(fa, fb, x, case_name):
    """With duplicate rows, hardest pairs tie between equal points and any split of the
    gradient among the duplicates is a valid subgradient: compare per duplicate group."""
    if case_name != "duplicates":
        return assert_close_vg(fa, fb, x)
    xa, xb = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    va, vb = fa(xa), fb(xb)
    torch.testing.assert_close(va, vb, rtol=1e-6, atol=1e-9)
    ga = torch.autograd.grad(va, xa, allow_unused=True)[0]
    gb = torch.autograd.grad(vb, xb, allow_unused=True)[0]
    ga, gb = (torch.zeros_like(x) if g is None else g.clone() for g in (ga, gb))
    for keep, dup in ((0, 1), (3, 5)):
        if dup < len(x):
            ga[keep] += ga[dup]
            gb[keep] += gb[dup]
            ga[dup] = gb[dup] = 0
    torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------- against the official algorithm
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("name", NAMES)
def test_all_pairs_against_official(name, case):
    x, y = make_case(case, seed=4)
    for n, normalize in GRID:
        loss = ours(name, n, "all", normalize)
        assert_close_up_to_ties(lambda e: loss(e, y),
                                lambda e: official(name, e, y, n, "all", normalize, HP[name]),
                                x, case[0])


@pytest.mark.parametrize("case", [c for c in CASES if c[1] > 1], ids=[c[0] for c in CASES if c[1] > 1])
@pytest.mark.parametrize("name", NAMES)
def test_adjacent_pairs_against_official(name, case):
    x, y = adjacent_batch(case, seed=6)
    for n, normalize in GRID:
        loss = ours(name, n, "adjacent", normalize)
        assert_close_up_to_ties(lambda e: loss(e, y),
                                lambda e: official(name, e, y, n, "adjacent", normalize, HP[name]),
                                x, case[0])


ALT = [  # non-default distances and options
    ("HPHNTripletLoss", {"margin": 0.1}, pml_dist.CosineSimilarity()),
    ("TripletMarginLoss", {"margin": 0.2}, pml_dist.CosineSimilarity()),
    ("TripletMarginLoss", {"margin": 0.05, "smooth_loss": True}, None),
    ("MultiSimilarityLoss", {"alpha": 2.0, "beta": 50.0, "base": 0.5}, pml_dist.LpDistance()),
    ("LiftedStructureLoss", {"neg_margin": 0.3, "pos_margin": 0.9}, pml_dist.CosineSimilarity()),
    ("LiftedStructureLoss", {"neg_margin": 1.5, "pos_margin": 0.0}, pml_dist.LpDistance(power=2)),
    ("NPairsLoss", {}, pml_dist.LpDistance()),
    ("GeneralizedLiftedStructureLoss", {"neg_margin": 0.3, "pos_margin": 0.9},
     pml_dist.CosineSimilarity()),
]


@pytest.mark.parametrize("name,hp,distance", ALT, ids=[f"{a}-{i}" for i, (a, _, _) in enumerate(ALT)])
@pytest.mark.parametrize("pairs", ["all", "adjacent"])
def test_other_distances_against_official(name, hp, distance, pairs):
    for case in (CASES[0], CASES[1]):
        x, y = make_case(case, seed=7) if pairs == "all" else adjacent_batch(case, seed=7)
        for n, normalize in ((0, True), (2, True), (3, False)):
            loss = ours(name, n, pairs, normalize, hp=hp, distance=distance)
            assert_close_vg(lambda e: loss(e, y),
                            lambda e: official(name, e, y, n, pairs, normalize, hp, distance), x)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("name", NAMES)
def test_zero_points_is_the_clean_loss(name, case):
    # n = 0 adds nothing: the expanded loss is the clean one, itself tested against PML
    x, y = make_case(case, seed=9)
    clean = getattr(mo.losses, name)(backend="reference", **HP[name])
    assert_close_vg(lambda e: ours(name, 0, "all", True)(e, y), lambda e: clean(e, y), x)


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck(name):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(8, 5, dtype=torch.float64, generator=g)
    y = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0])
    loss = ours(name, 2, "all", True)
    assert torch.autograd.gradcheck(lambda e: loss(e, y), (x.requires_grad_(),))
    loss = ours(name, 1, "adjacent", False)
    ya = torch.tensor([0, 0, 1, 1, 2, 2, 0, 0])
    assert torch.autograd.gradcheck(lambda e: loss(e, ya), (x,))


def test_synthetic_points_change_the_loss():
    # guards against an expansion that silently does nothing
    x, y = make_case(CASES[1], seed=2)
    for name in NAMES:
        a, b = ours(name, 0, "all", True)(x, y), ours(name, 3, "all", True)(x, y)
        assert not torch.allclose(a, b), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_compute_in_fp32(dtype):
    x, y = make_case(CASES[1], seed=5)
    xh = x.detach().to(dtype)
    for name in NAMES:
        loss = ours(name, 2, "all", True)
        out = loss(xh.requires_grad_(), y)
        assert out.dtype == torch.float32 and torch.isfinite(out)
        torch.testing.assert_close(out, loss(xh.detach().float(), y))
        out.backward()
        assert xh.grad.dtype == dtype and torch.isfinite(xh.grad.float()).all()
        xh.grad = None


class _MaxNumel(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.max = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if torch.is_tensor(t):
                self.max = max(self.max, t.numel())
        return out


@pytest.mark.parametrize("name", ["HPHNTripletLoss", "MultiSimilarityLoss", "NPairsLoss",
                                  "GeneralizedLiftedStructureLoss"])
def test_no_points_by_points_matrix(name):
    # 3 classes of 10 rows, n = 4, all pairs: P = 30 + 4·135 = 570 points. Every tensor the
    # forward and backward create stays O(B·P); the official algorithm's P×P matrix would
    # be 325k entries and its point stack P·D.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 64, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.arange(3).repeat_interleave(10)
    b, p = 30, 30 + 4 * 135
    with _MaxNumel() as m:
        ours(name, 4, "all", True)(x, y).backward()
    assert m.max <= 2 * b * p < p * p // 4


# ---------------------------------------------------------------- errors
def test_adjacent_checks_labels():
    x = torch.randn(6, 4)
    with pytest.raises(ValueError, match=r"rows 2 and 3 have labels 1 and 2 \(1 such pair"):
        ours("HPHNTripletLoss", 2, "adjacent", True)(x, torch.tensor([0, 0, 1, 2, 2, 2]))
    with pytest.raises(ValueError, match="even batch size; got 5 rows"):
        ours("MultiSimilarityLoss", 2, "adjacent", True)(x[:5], torch.tensor([0, 0, 1, 1, 2]))
    with pytest.raises(ValueError, match="even batch size; got 1 rows"):
        ours("NPairsLoss", 1, "adjacent", True)(x[:1], torch.tensor([0]))


def test_unsupported_calls_say_why():
    x, y = make_case(CASES[1])
    with pytest.raises(NotImplementedError, match="implemented for .*'HPHNTripletLoss'.*not ContrastiveLoss"):
        mo.losses.ContrastiveLoss(backend="reference", expansion=mo.Expansion())(x, y)
    tl = ours("TripletMarginLoss", 2, "all", True)
    with pytest.raises(NotImplementedError, match="ref_emb"):
        tl(x, y, ref_emb=x.detach()[:5], ref_labels=y[:5])
    with pytest.raises(NotImplementedError, match="indices_tuple"):
        tl(x, y, (torch.tensor([0]), torch.tensor([1]), torch.tensor([2])))
    for dist in (pml_dist.LpDistance(p=1), pml_dist.LpDistance(normalize_embeddings=False),
                 pml_dist.CosineSimilarity(power=2)):
        with pytest.raises(NotImplementedError, match="Embedding Expansion"):
            ours("TripletMarginLoss", 2, "all", True, distance=dist)(x, y)
    for hp in ({"swap": True}, {"triplets_per_anchor": 3}):
        with pytest.raises(NotImplementedError, match="triplets_per_anchor='all' and swap=False"):
            ours("TripletMarginLoss", 2, "all", True, hp=hp)(x, y)
