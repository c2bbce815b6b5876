"""Embedding Expansion against the official algorithm: every synthetic point materialised,
the dense distance matrix over all B(n+1)-ish points, and the hard-negative-pair rule by
explicit search."""
import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pl
from pytorch_metric_learning import miners as pm
from pytorch_metric_learning import reducers as pr
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

import metrix_ops as mo
from cases import CASE_IDS, CASES, assert_close_vg, make_case


def materialise(x, y, n, pairs, normalize):
    xh = F.normalize(x, dim=1)
    b = len(x)
    pts, cls, ends = [xh[i] for i in range(b)], [int(y[i]) for i in range(b)], [{i} for i in range(b)]
    if pairs == "adjacent":
        segs = [(t, t + 1) for t in range(0, b, 2)]
    else:
        segs = [(i, j) for i in range(b) for j in range(i + 1, b) if y[i] == y[j]]
    for k in range(1, n + 1):
        for i, j in segs:
            v = (k * xh[i] + (n + 1 - k) * xh[j]) / (n + 1)
            pts.append(F.normalize(v, dim=0) if normalize else v)
            cls.append(int(y[i]))
            ends.append({i, j})
    V = torch.stack(pts)
    diff = V[:, None, :] - V[None, :, :]
    d2 = (diff**2).sum(-1)
    coincident = d2 < 16 * torch.finfo(d2.dtype).eps  # zero subgradient, as cdist
    D = torch.where(coincident, d2.detach().sqrt(), d2.clamp_min(1e-300).sqrt())
    Vn = F.normalize(V, dim=1)
    S = Vn @ Vn.t()
    return V, D, S, cls, ends


def sides(i, y, cls, ends):
    A = [a for a, e in enumerate(ends) if i in e]
    Q = [q for q, c in enumerate(cls) if c != int(y[i])]
    return A, Q


def official(name, x, y, n, pairs, normalize, hp):
    V, D, S, cls, ends = materialise(x, y, n, pairs, normalize)
    b = len(x)
    zero = (x * 0).sum()
    P = lambda i: [p for p in range(b) if p != i and y[p] == y[i]]  # noqa: E731

    def dee(i):  # per negative point of i: the closest pair across i's side and it
        A, Q = sides(i, y, cls, ends)
        return (D[A][:, Q].min(0).values if Q else None), (S[A][:, Q].max(0).values if Q else None), Q

    if name == "HPHNTripletLoss":
        terms = [torch.relu(D[i, P(i)].max() - dee(i)[0].min() + hp["margin"])
                 for i in range(b) if P(i) and dee(i)[2]]
        return torch.stack(terms).mean() if terms else zero
    if name == "TripletMarginLoss":
        terms = [torch.relu(D[i, P(i)][:, None] - dee(i)[0][None, :] + hp["margin"]).flatten()
                 for i in range(b) if P(i) and dee(i)[2]]
        t = torch.cat(terms) if terms else x.new_zeros(0)
        return t[t > 0].mean() if (t > 0).any() else zero
    if name == "MultiSimilarityLoss":
        out = []
        for i in range(b):
            _, see, Q = dee(i)
            sp = torch.exp(-hp["alpha"] * (S[i, P(i)] - hp["base"])).sum()
            sn = torch.exp(hp["beta"] * (see - hp["base"])).sum() if Q else zero
            out.append(torch.log1p(sp) / hp["alpha"] + torch.log1p(sn) / hp["beta"])
        return torch.stack(out).mean()
    if name == "LiftedStructureLoss":
        if all(c == cls[0] for c in cls):
            return zero
        terms = []
        for a in range(b):
            for p in P(a):
                negs = [hp["neg_margin"] - dee(k)[0] for k in (a, p) if dee(k)[2]]
                lse = torch.logsumexp(torch.cat(negs), 0) if negs else zero
                terms.append(torch.relu(lse + D[a, p] - hp["pos_margin"]) ** 2 / 2)
        return torch.stack(terms).mean() if terms else zero
    # NPairsLoss: PML's pairs, logits to the pairs' positives plus the closest-pair scores
    # of the synthetic negatives
    a_idx, p_idx = lmu.convert_to_pos_pairs_with_unique_labels(None, y)
    if len(a_idx) == 0:
        return zero
    losses = []
    for k, a in enumerate(a_idx.tolist()):
        _, see, Q = dee(a)
        synth = [t for t, q in enumerate(Q) if q >= b]
        logits = torch.cat([S[a, p_idx], see[synth] if synth else x.new_zeros(0)])
        losses.append(-torch.log_softmax(logits, 0)[k])
    return torch.stack(losses).mean()


HP = {"HPHNTripletLoss": {"margin": 0.2}, "TripletMarginLoss": {"margin": 0.1},
      "MultiSimilarityLoss": {"alpha": 2.0, "beta": 10.0, "base": 0.5},
      "LiftedStructureLoss": {"neg_margin": 1.0, "pos_margin": 0.0}, "NPairsLoss": {}}
DIST = {"MultiSimilarityLoss": None, "NPairsLoss": None}  # their defaults are similarities


def ours(name, n, pairs, normalize):
    return getattr(mo.losses, name)(backend="reference", **HP[name],
                                    expansion=mo.Expansion(n_points=n, pairs=pairs, normalize=normalize))


def assert_close_up_to_ties(fa, fb, x, case):
    """With duplicate rows the hardest pair is a tie between equal points, and any split of
    the gradient among the duplicates is a valid subgradient: compare per duplicate group."""
    if case[0] != "duplicates":
        return assert_close_vg(fa, fb, x)
    va, vb = fa(x), fb(x)
    torch.testing.assert_close(va, vb, rtol=1e-6, atol=1e-9)
    ga = torch.autograd.grad(va, x, allow_unused=True)[0]
    gb = torch.autograd.grad(vb, x, allow_unused=True)[0]
    ga, gb = (torch.zeros_like(x) if g is None else g for g in (ga, gb))
    for grp in ([0, 1], [3, 5]):
        ga[grp[0]] = ga[grp].sum(0)
        gb[grp[0]] = gb[grp].sum(0)
        ga[grp[1]] = gb[grp[1]] = 0
    torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("name", sorted(HP))
def test_all_pairs_against_official(name, case):
    x, y = make_case(case, seed=4)
    for n, normalize in ((0, True), (1, False), (3, True)):
        loss = ours(name, n, "all", normalize)
        assert_close_up_to_ties(lambda e: loss(e, y),
                                lambda e: official(name, e, y, n, "all", normalize, HP[name]), x, case)


@pytest.mark.parametrize("name", sorted(HP))
@pytest.mark.parametrize("normalize", [True, False])
def test_adjacent_pairs_against_official(name, normalize):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(12, 6, dtype=torch.float64, generator=g)
    y = torch.tensor([0, 0, 1, 1, 0, 0, 2, 2, 3, 3, 1, 1])
    for n in (1, 5):
        loss = ours(name, n, "adjacent", normalize)
        assert_close_vg(lambda e: loss(e, y), lambda e: official(name, e, y, n, "adjacent", normalize, HP[name]), x)


def test_hphn_without_expansion_is_pml_batch_hard():
    for case in CASES:
        x, y = make_case(case, seed=1)
        for margin in (0.2, 0.05):
            ours_loss = mo.losses.HPHNTripletLoss(margin=margin, backend="reference")
            pml = pl.TripletMarginLoss(margin=margin, reducer=pr.MeanReducer())
            assert_close_vg(lambda e: ours_loss(e, y), lambda e: pml(e, y, pm.BatchHardMiner()(e, y)), x)


def test_hphn_sum_reduction_official_setting():
    x, y = make_case(CASES[1], seed=2)
    mean = mo.losses.HPHNTripletLoss(margin=1e-5, backend="reference", expansion=mo.Expansion(2))
    total = mo.losses.HPHNTripletLoss(margin=1e-5, reduction="sum", backend="reference",
                                      expansion=mo.Expansion(2))
    has = torch.tensor([(y == y[i]).sum() > 1 and (y != y[i]).any() for i in range(len(y))])
    torch.testing.assert_close(total(x, y), mean(x, y) * has.sum())


def test_adjacent_checks_labels():
    x = torch.randn(6, 4)
    with pytest.raises(ValueError, match="rows 2 and 3 have labels 1 and 2"):
        ours("HPHNTripletLoss", 2, "adjacent", True)(x, torch.tensor([0, 0, 1, 2, 2, 2]))
    with pytest.raises(ValueError, match="even batch size"):
        ours("HPHNTripletLoss", 2, "adjacent", True)(x[:5], torch.tensor([0, 0, 1, 1, 2]))


def test_gradcheck_expansion():
    x, y = make_case(CASES[1], seed=3)
    x = x[:8].detach()
    y = y[:8]
    for name in ("HPHNTripletLoss", "MultiSimilarityLoss"):
        loss = ours(name, 2, "all", True)
        assert torch.autograd.gradcheck(lambda e: loss(e, y), (x.clone().requires_grad_(),))


def test_unsupported_losses_say_which_are():
    x, y = make_case(CASES[1])
    with pytest.raises(NotImplementedError, match="Embedding Expansion is implemented for"):
        mo.losses.ContrastiveLoss(backend="reference", expansion=mo.Expansion())(x, y)
