"""Metrix against an independent computation that materialises every mixed embedding and
applies the generic soft-label formula of DESIGN §3 with plain loops."""
import math

import pytest
import torch
import torch.nn.functional as F

import metrix_ops as mo
from cases import CASE_IDS, CASES, assert_close_vg, make_case

SCHEMES = ["pos_neg", "anchor_neg", "pos_pos", "neg_neg"]
IN_BATCH = {"ContrastiveLoss": {"pos_margin": 0.1, "neg_margin": 0.8},
            "MultiSimilarityLoss": {"alpha": 2.0, "beta": 10.0, "base": 0.5}}
C = 11


def unit(v):
    return v / v.norm().clamp_min(1e-12)


def dist(u, v):
    """‖u − v‖ with cdist's convention at coincident points: the zero subgradient (there the
    direction of u − v is rounding noise, in any implementation)."""
    d2 = ((u - v) ** 2).sum()
    return d2.detach().sqrt() if d2 < 16 * torch.finfo(d2.dtype).eps else d2.sqrt()


def candidates(a, xh, rh, y, ry, same_set, scheme, lam):
    """(V̂ K×D, labels K) of anchor a, enumerated from DESIGN §3's words; every mixed point
    is built and normalised explicitly."""
    m = len(rh)
    P = [j for j in range(m) if ry[j] == y[a] and not (same_set and j == a)]
    N = [j for j in range(m) if ry[j] != y[a]]

    def mix(us, ws, label, distinct=False):
        pairs = [(u, w) for u in us for w in ws if not (distinct and u == w)]
        if not pairs:
            return None
        U = torch.stack([rh[u] if isinstance(u, int) else u for u, _ in pairs])
        W = torch.stack([rh[w] for _, w in pairs])
        V = lam * U + (1 - lam) * W
        V = V / V.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return V, torch.full((len(pairs),), float(label), dtype=V.dtype)

    if scheme == "pos_neg":
        return mix(P, N, lam) if P else mix([xh[a]], N, lam)
    if scheme == "anchor_neg":
        return mix([xh[a]], N, lam)
    if scheme == "pos_pos":
        return mix(P, P, 1.0, distinct=True)
    return mix(N, N, 0.0, distinct=True)


def materialised_in_batch(name, hp, x, y, scheme, lam, r=None, ry=None):
    same_set = r is None
    xh = F.normalize(x, dim=1)
    rh = xh if same_set else F.normalize(r, dim=1)
    ry = y if same_set else ry
    pos_terms, neg_terms, per_anchor = [], [], []
    for a in range(len(x)):
        found = candidates(a, xh, rh, y, ry, same_set, scheme, lam)
        if found is None:
            continue
        V, lab = found
        if name == "ContrastiveLoss":
            d = torch.stack([dist(xh[a], v) for v in V])
            pos_terms.append(lab * torch.relu(d - hp["pos_margin"]))
            neg_terms.append((1 - lab) * torch.relu(hp["neg_margin"] - d))
        else:
            s = V @ xh[a]
            sp = (lab * torch.exp(-hp["alpha"] * (s - hp["base"]))).sum()
            sn = ((1 - lab) * torch.exp(hp["beta"] * (s - hp["base"]))).sum()
            per_anchor.append(torch.log1p(sp) / hp["alpha"] + torch.log1p(sn) / hp["beta"])
    zero = (x * 0).sum()
    if name == "ContrastiveLoss":
        def avg_nonzero(ts):
            t = torch.cat(ts) if ts else x.new_zeros(0)
            return t[t > 0].mean() if (t > 0).any() else zero
        return avg_nonzero(pos_terms) + avg_nonzero(neg_terms)
    return torch.stack(per_anchor).mean() if per_anchor else zero


def materialised_proxy(name, hp, x, y, P, scheme, lam):
    xh, ph = F.normalize(x, dim=1), F.normalize(P, dim=1)
    vs, ys = [], []
    for i in range(len(x)):
        for j in range(len(x)):
            if i != j and ((y[i] == y[j]) == (scheme == "pos_pos")):
                vs.append(unit(lam * xh[i] + (1 - lam) * xh[j]))
                ys.append(lam * F.one_hot(y[i], C).double() + (1 - lam) * F.one_hot(y[j], C).double())
    if not vs:
        return (x * 0).sum() + (P * 0).sum()
    V, Y = torch.stack(vs), torch.stack(ys)
    if name == "ProxyNCALoss":
        logits = -hp.get("softmax_scale", 1.0) * ((V[:, None, :] - ph[None]) ** 2).sum(-1)
        return -(Y * torch.log_softmax(logits, 1)).sum(1).mean()
    s = ph @ V.t()  # C × K
    a, dl = hp["alpha"], hp["margin"]
    pos = torch.log1p((Y.t() * torch.exp(-a * (s - dl))).sum(1))
    neg = torch.log1p(((1 - Y.t()) * torch.exp(a * (s + dl))).sum(1))
    with_pos = (Y.t().sum(1) > 0).sum()
    return pos.sum() / with_pos + neg.sum() / C


def mixed_term(loss_cls_name, hp, scheme, lam, *ctor):
    clean = getattr(mo.losses, loss_cls_name)(*ctor, backend="reference", **hp)
    mixed = getattr(mo.losses, loss_cls_name)(*ctor, backend="reference", **hp,
                                             metrix=mo.Metrix(pairs=scheme, weight=1.0))
    return clean, mixed


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("name", sorted(IN_BATCH))
def test_embedding_level_equals_materialised(name, scheme, case):
    x, y = make_case(case, seed=7)
    hp = IN_BATCH[name]
    clean, mixed = mixed_term(name, hp, scheme, 0.3)
    for lam in (0.3, 0.7, 0.0, 1.0):
        assert_close_vg(lambda e: mixed(e, y, lam=lam) - clean(e, y),
                        lambda e: materialised_in_batch(name, hp, e, y, scheme, lam), x)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("name", sorted(IN_BATCH))
def test_embedding_level_with_ref_emb(name, scheme):
    g = torch.Generator().manual_seed(3)
    x, r = torch.randn(7, 5, dtype=torch.float64, generator=g), torch.randn(9, 5, dtype=torch.float64, generator=g)
    y, ry = torch.randint(0, 3, (7,), generator=g), torch.randint(0, 3, (9,), generator=g)
    hp = IN_BATCH[name]
    clean, mixed = mixed_term(name, hp, scheme, 0.4)
    assert_close_vg(lambda e, f: mixed(e, y, ref_emb=f, ref_labels=ry, lam=0.4) - clean(e, y, ref_emb=f, ref_labels=ry),
                    lambda e, f: materialised_in_batch(name, hp, e, y, scheme, 0.4, f, ry), x, r)


@pytest.mark.parametrize("case", CASES[:4] + CASES[5:], ids=CASE_IDS[:4] + CASE_IDS[5:])
@pytest.mark.parametrize("scheme", ["pos_neg", "pos_pos"])
@pytest.mark.parametrize("name,hp", [("ProxyAnchorLoss", {"margin": 0.1, "alpha": 8.0}),
                                     ("ProxyNCALoss", {"softmax_scale": 2.0})])
def test_proxy_losses_equal_materialised(name, hp, scheme, case):
    x, y = make_case(case, seed=5)
    clean, mixed = mixed_term(name, hp, scheme, 0.35, C, x.shape[1])
    clean, mixed = clean.double(), mixed.double()
    with torch.no_grad():
        mixed.proxies.copy_(clean.proxies)
    P = clean.proxies.detach().clone()

    def ours(e, p):
        with torch.no_grad():
            clean.proxies.copy_(p)
            mixed.proxies.copy_(p)
        return mixed(e, y, lam=0.35) - clean(e, y)

    v = ours(x, P)
    ref = materialised_proxy(name, hp, x, y, P, scheme, 0.35)
    torch.testing.assert_close(v, ref.to(v.dtype), rtol=1e-6, atol=1e-9)
    # gradients w.r.t. embeddings and proxies through a functional call
    fn = getattr(mo.functional, "proxy_anchor_loss" if name == "ProxyAnchorLoss" else "proxy_nca_loss")
    assert_close_vg(lambda e, p: fn(e, y, proxies=p, backend="reference", lam=0.35,
                                    metrix=mo.Metrix(pairs=scheme, weight=1.0), **hp)
                    - fn(e, y, proxies=p, backend="reference", **hp),
                    lambda e, p: materialised_proxy(name, hp, e, y, p, scheme, 0.35), x, P)


def test_weight_and_lambda_draws():
    x, y = make_case(CASES[1])
    clean = mo.losses.MultiSimilarityLoss(backend="reference")
    m1 = mo.losses.MultiSimilarityLoss(backend="reference", metrix=mo.Metrix(weight=1.0))
    m4 = mo.losses.MultiSimilarityLoss(backend="reference", metrix=mo.Metrix(weight=0.4))
    torch.testing.assert_close(m4(x, y, lam=0.6) - clean(x, y), 0.4 * (m1(x, y, lam=0.6) - clean(x, y)))
    torch.manual_seed(123)
    a = m1(x, y)
    torch.manual_seed(123)
    b = m1(x, y)
    torch.manual_seed(123)
    lam = float(torch.distributions.Beta(torch.tensor(2.0, dtype=torch.float64),
                                         torch.tensor(2.0, dtype=torch.float64)).sample())
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, m1(x, y, lam=lam))
    fixed = mo.losses.MultiSimilarityLoss(backend="reference", metrix=mo.Metrix(weight=1.0, lam=0.25))
    torch.testing.assert_close(fixed(x, y), m1(x, y, lam=0.25))


def test_gradcheck_embedding_level():
    x, y = make_case(CASES[2])
    for name in IN_BATCH:
        loss = getattr(mo.losses, name)(backend="reference", metrix=mo.Metrix(weight=1.0))
        assert torch.autograd.gradcheck(lambda e: loss(e, y, lam=0.3), (x.detach().requires_grad_(),))


def test_unsupported_loss_says_which_are():
    x, y = make_case(CASES[1])
    with pytest.raises(NotImplementedError, match="Metrix is implemented for"):
        mo.losses.TripletMarginLoss(backend="reference", metrix=mo.Metrix())(x, y)


def test_half_inputs():
    x, y = make_case(CASES[1])
    loss = mo.losses.MultiSimilarityLoss(backend="reference", metrix=mo.Metrix())
    ref = loss(x, y, lam=0.5)
    for dt in (torch.float16, torch.bfloat16):
        out = loss(x.detach().to(dt), y, lam=0.5)
        assert torch.isfinite(out) and abs(float(out.detach()) - float(ref)) < 5e-2 * abs(float(ref))
