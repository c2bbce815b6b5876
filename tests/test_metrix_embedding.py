"""Embedding-level Metrix against an independent computation that materialises every
mixed embedding (explicit loops over anchors and candidate pairs, v̂ = normalise(λ x̂_u +
(1−λ) x̂_w)) and applies the generic soft-label formula of DESIGN §3 per loss directly.
The oracle shares no code with metrix_ops.reference.metrix; `loss_from_candidates` is also
the oracle of tests/test_metrix_mixed_batch.py."""
import pytest
import torch
import torch.nn.functional as F

import metrix_ops as mo
from cases import CASE_IDS, CASES, assert_close_vg, make_case

SCHEMES = ["pos_neg", "anchor_neg", "pos_pos", "neg_neg"]
LAMS = (0.3, 0.7, 0.0, 1.0)
C = 11  # classes of the proxy losses (labels of CASES are < 11)

# in-batch losses: (loss class, distance or None, non-default hyper-parameters)
IN_BATCH = {
    "ContrastiveLoss": ("ContrastiveLoss", None, {"pos_margin": 0.1, "neg_margin": 0.8}),
    "ContrastiveLoss-cosine": ("ContrastiveLoss", "cosine", {"pos_margin": 0.9, "neg_margin": 0.2}),
    "MultiSimilarityLoss": ("MultiSimilarityLoss", None, {"alpha": 2.0, "beta": 50.0, "base": 0.5}),
    "CircleLoss": ("CircleLoss", None, {"m": 0.3, "gamma": 32.0}),
    "GeneralizedLiftedStructureLoss": ("GeneralizedLiftedStructureLoss", None,
                                       {"neg_margin": 0.9, "pos_margin": 0.1}),
}
PROXY = {"ProxyAnchorLoss": {"margin": 0.1, "alpha": 32.0},
         "ProxyNCALoss": {"softmax_scale": 2.0, "temperature": 0.5}}


def dists(a, V):
    """‖a − v‖ per row, with cdist's convention at coincident points: the zero subgradient
    (there the direction of a − v is rounding noise, in any implementation)."""
    d2 = ((a[None, :] - V) ** 2).sum(1)
    coincident = d2 < 16 * torch.finfo(d2.dtype).eps
    return torch.where(coincident, d2.detach().sqrt(), d2.clamp_min(1e-300).sqrt())


def mix_rows(T, us, ws, lam):
    """Materialises v̂_k = normalise(λ T[u_k] + (1−λ) T[w_k]) for the listed pairs."""
    us, ws = torch.as_tensor(us), torch.as_tensor(ws)  # (a list index is slow in torch)
    V = lam * T[us] + (1 - lam) * T[ws]
    return V / V.norm(dim=1, keepdim=True).clamp_min(1e-12)


def candidates(a, y, ry, same_set, scheme, lam):
    """(u, w, label) triples of anchor a, enumerated from DESIGN §3's words with plain loops.
    Indices < M are references; M + a is the anchor itself (T = [refs; anchors])."""
    m = len(ry)
    P = [j for j in range(m) if ry[j] == y[a] and not (same_set and j == a)]
    N = [j for j in range(m) if ry[j] != y[a]]
    if scheme == "pos_neg" and P:
        return [(p, n, lam) for p in P for n in N]
    if scheme in ("pos_neg", "anchor_neg"):  # pos_neg: for an anchor with no positive
        return [(m + a, n, lam) for n in N]
    if scheme == "pos_pos":
        return [(p, q, 1.0) for p in P for q in P if p != q]
    return [(n, o, 0.0) for n in N for o in N if n != o]


def _lse_or_zero(w, x):
    """log Σ w·e^x over the terms with w > 0; None when there are none (PML's empty side)."""
    keep = w > 0
    return torch.logsumexp(x[keep] + torch.log(w[keep]), 0) if bool(keep.any()) else None


def loss_from_candidates(key, xh, cands):
    """The generic formula of DESIGN §3 per loss, applied anchor by anchor. xh: normalised
    anchors; cands[a]: (V̂ K×D unit mixed points, y K soft labels) of anchor a, or None."""
    name, distance, hp = IN_BATCH[key]
    zero = (xh * 0).sum()
    pos_terms, neg_terms, per_anchor = [], [], []
    for a, cand in enumerate(cands):
        if cand is None:
            continue
        V, lab = cand
        s = V @ xh[a]
        if name == "ContrastiveLoss":
            if distance == "cosine":
                pos_terms.append(lab * torch.relu(hp["pos_margin"] - s))
                neg_terms.append((1 - lab) * torch.relu(s - hp["neg_margin"]))
            else:
                d = dists(xh[a], V)
                pos_terms.append(lab * torch.relu(d - hp["pos_margin"]))
                neg_terms.append((1 - lab) * torch.relu(hp["neg_margin"] - d))
        elif name == "MultiSimilarityLoss":  # float64: β = 50 cannot overflow here
            al, be, base = hp["alpha"], hp["beta"], hp["base"]
            sp = (lab * torch.exp(-al * (s - base))).sum()
            sn = ((1 - lab) * torch.exp(be * (s - base))).sum()
            per_anchor.append(torch.log1p(sp) / al + torch.log1p(sn) / be)
        elif name == "CircleLoss":
            m, g = hp["m"], hp["gamma"]
            sp = (lab * torch.exp(-g * torch.relu(1 + m - s.detach()) * (s - (1 - m)))).sum()
            sn = ((1 - lab) * torch.exp(g * torch.relu(s.detach() + m) * (s - m))).sum()
            has = bool((lab > 0).any()) and bool((lab < 1).any())
            per_anchor.append(F.softplus(torch.log(sp) + torch.log(sn)) if has else zero)
        else:  # generalised lifted structure, Lp distance
            d = dists(xh[a], V)
            lp = _lse_or_zero(lab, d - hp["pos_margin"])
            ln = _lse_or_zero(1 - lab, hp["neg_margin"] - d)
            per_anchor.append(torch.relu((zero if lp is None else lp) + (zero if ln is None else ln)))

    def avg_nonzero(ts):
        t = torch.cat([t.reshape(-1) for t in ts]) if ts else xh.new_zeros(0)
        return t[t > 0].mean() if (t > 0).any() else zero

    if name == "ContrastiveLoss":
        return avg_nonzero(pos_terms) + avg_nonzero(neg_terms)
    if name == "CircleLoss":
        return avg_nonzero(per_anchor)
    return torch.stack(per_anchor).mean() if per_anchor else zero


def materialised_in_batch(key, x, y, scheme, lam, r=None, ry=None):
    same_set = r is None
    xh = F.normalize(x, dim=1)
    rh = xh if same_set else F.normalize(r, dim=1)
    ry = y if same_set else ry
    T = torch.cat([rh, xh])
    cands = []
    for a in range(len(x)):
        trip = candidates(a, y, ry, same_set, scheme, lam)
        if not trip:
            cands.append(None)
            continue
        us, ws, lab = zip(*trip)
        cands.append((mix_rows(T, list(us), list(ws), lam), torch.tensor(lab, dtype=x.dtype)))
    return loss_from_candidates(key, xh, cands)


def proxy_loss_from_candidates(name, hp, V, Y, P):
    """V: K unit mixed points, Y: K × C class masses, P: proxies (raw)."""
    ph = F.normalize(P, dim=1)
    if name == "ProxyNCALoss":  # soft-target cross-entropy of each mixed query over proxies
        scale = hp["softmax_scale"] / hp.get("temperature", 1.0)
        logits = -scale * ((V[:, None, :] - ph[None, :, :]) ** 2).sum(-1)
        return -(Y * torch.log_softmax(logits, 1)).sum(1).mean()
    al, dl = hp["alpha"], hp["margin"]
    pos, neg, with_pos = 0, 0, 0
    for c in range(len(ph)):  # proxies are the anchors
        s = V @ ph[c]
        if bool((Y[:, c] > 0).any()):
            pos, with_pos = pos + torch.log1p((Y[:, c] * torch.exp(-al * (s - dl))).sum()), with_pos + 1
        neg = neg + torch.log1p(((1 - Y[:, c]) * torch.exp(al * (s + dl))).sum())
    return (pos / with_pos if with_pos else 0) + neg / len(ph)


def materialised_proxy(name, hp, x, y, P, scheme, lam):
    xh = F.normalize(x, dim=1)
    pairs = [(i, j) for i in range(len(x)) for j in range(len(x))
             if i != j and bool(y[i] == y[j]) == (scheme == "pos_pos")]
    if not pairs:
        return (x * 0).sum() + (P * 0).sum()
    i, j = map(list, zip(*pairs))
    oh = F.one_hot(y, C).to(x.dtype)
    return proxy_loss_from_candidates(name, hp, mix_rows(xh, i, j, lam),
                                      lam * oh[i] + (1 - lam) * oh[j], P)


def make_loss(key, scheme=None, weight=1.0, level="embedding"):
    name, distance, hp = IN_BATCH[key]
    kw = {"distance": mo.distances.CosineSimilarity()} if distance == "cosine" else {}
    metrix = None if scheme is None else mo.Metrix(level=level, pairs=scheme, weight=weight)
    return getattr(mo.losses, name)(backend="reference", metrix=metrix, **kw, **hp)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("key", sorted(IN_BATCH))
def test_embedding_level_equals_materialised(key, scheme, case):
    x, y = make_case(case, seed=7)
    clean, mixed = make_loss(key), make_loss(key, scheme)
    for lam in LAMS:
        v = assert_close_vg(lambda e: mixed(e, y, lam=lam) - clean(e, y),
                            lambda e: materialised_in_batch(key, e, y, scheme, lam), x)
        assert torch.isfinite(v)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("key", sorted(IN_BATCH))
def test_embedding_level_with_ref_emb(key, scheme):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 5, dtype=torch.float64, generator=g)
    r = torch.randn(9, 5, dtype=torch.float64, generator=g)
    y, ry = torch.randint(0, 3, (7,), generator=g), torch.randint(0, 3, (9,), generator=g)
    r[4] = x[2]  # a reference that duplicates an anchor: it is still a candidate (not same_set)
    ry[4] = y[2]
    clean, mixed = make_loss(key), make_loss(key, scheme)
    for lam in (0.4, 1.0):
        assert_close_vg(lambda e, f: mixed(e, y, ref_emb=f, ref_labels=ry, lam=lam)
                        - clean(e, y, ref_emb=f, ref_labels=ry),
                        lambda e, f: materialised_in_batch(key, e, y, scheme, lam, f, ry), x, r)


def proxy_pair(name, d, scheme, seed=0):
    hp = PROXY[name]
    torch.manual_seed(seed)
    clean = getattr(mo.losses, name)(C, d, backend="reference", **hp).double()
    return clean, hp


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("name", sorted(PROXY))
def test_proxy_losses_equal_materialised(name, scheme, case):
    x, y = make_case(case, seed=5)
    clean, hp = proxy_pair(name, x.shape[1], scheme)
    P = clean.proxies.detach().clone()
    fn = getattr(mo.functional, "proxy_anchor_loss" if name == "ProxyAnchorLoss" else "proxy_nca_loss")
    for lam in (0.35, 0.0, 1.0):
        # value and gradient w.r.t. embeddings and proxies, through the functional form
        v = assert_close_vg(lambda e, p: fn(e, y, proxies=p, backend="reference", lam=lam,
                                            metrix=mo.Metrix(pairs=scheme, weight=1.0), **hp)
                            - fn(e, y, proxies=p, backend="reference", **hp),
                            lambda e, p: materialised_proxy(name, hp, e, y, p, scheme, lam), x, P)
        assert torch.isfinite(v)
    # and through the module, which owns the proxies
    mixed = getattr(mo.losses, name)(C, x.shape[1], backend="reference", **hp,
                                     metrix=mo.Metrix(pairs=scheme, weight=1.0)).double()
    with torch.no_grad():
        mixed.proxies.copy_(P)
    out = mixed(x, y, lam=0.35) - clean(x, y)
    torch.testing.assert_close(out, materialised_proxy(name, hp, x, y, P, scheme, 0.35).to(out.dtype),
                               rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("key", sorted(IN_BATCH) + sorted(PROXY))
def test_hard_labels_give_the_clean_loss(key):
    """The soft forms at y ∈ {0, 1} over the clean candidates are the clean losses (whose
    PML parity is tested elsewhere): the identity DESIGN §3 builds on."""
    from metrix_ops.reference.metrix_soft_forms import SOFT_FORMS
    x, y = make_case(CASES[1], seed=4)
    if key in PROXY:
        clean, hp = proxy_pair(key, x.shape[1], "pos_neg")
        P = clean.proxies.detach()
        dist_obj = mo.distances.CosineSimilarity() if key == "ProxyAnchorLoss" else mo.distances.LpDistance(power=2)

        def soft(e):
            s = F.normalize(e, dim=1) @ F.normalize(P, dim=1).t()
            t = F.one_hot(y, C).to(e.dtype)
            s, t = (s.t(), t.t()) if key == "ProxyAnchorLoss" else (s, t)
            return SOFT_FORMS[key](s, t, torch.ones_like(t, dtype=torch.bool), dist_obj, **hp)
        assert_close_vg(lambda e: clean(e, y), soft, x)
        return
    name, distance, hp = IN_BATCH[key]
    clean = make_loss(key)
    dist_obj = mo.distances.CosineSimilarity() if distance == "cosine" or name in (
        "MultiSimilarityLoss", "CircleLoss") else mo.distances.LpDistance()

    def soft(e):
        xh = F.normalize(e, dim=1)
        eye = torch.eye(len(y), dtype=torch.bool)
        same = y[:, None] == y[None, :]
        return SOFT_FORMS[name](xh @ xh.t(), same.to(e.dtype), ~eye, dist_obj, **hp)
    assert_close_vg(lambda e: clean(e, y), soft, x)


@pytest.mark.parametrize("key", sorted(IN_BATCH))
@pytest.mark.parametrize("scheme,case", [("pos_pos", 3), ("pos_neg", 4), ("anchor_neg", 4),
                                         ("neg_neg", 4), ("pos_neg", 5), ("neg_neg", 5)])
def test_empty_candidate_sets_give_zero_with_a_graph(key, scheme, case):
    """no_positives × pos_pos, one_class × schemes needing a negative, b1 × any: V(a) = ∅."""
    x, y = make_case(CASES[case])
    out = make_loss(key, scheme)(x, y, lam=0.4) - make_loss(key)(x, y)
    assert float(out.detach()) == 0.0 and out.requires_grad
    (g,) = torch.autograd.grad(out, x)  # (clean + 0) − clean: zero up to rounding
    torch.testing.assert_close(g, torch.zeros_like(x), rtol=0, atol=1e-14)


def test_weight_and_lambda_draws():
    x, y = make_case(CASES[1])
    clean = mo.losses.MultiSimilarityLoss(backend="reference")
    m1 = mo.losses.MultiSimilarityLoss(backend="reference", metrix=mo.Metrix(weight=1.0))
    m4 = mo.losses.MultiSimilarityLoss(backend="reference", metrix=mo.Metrix(weight=0.4))
    assert float((m1(x, y, lam=0.6) - clean(x, y)).detach()) > 1e-3  # the mixed term is not trivially 0
    assert_close_vg(lambda e: m4(e, y, lam=0.6) - clean(e, y),
                    lambda e: 0.4 * (m1(e, y, lam=0.6) - clean(e, y)), x)
    assert torch.equal(mo.losses.MultiSimilarityLoss(
        backend="reference", metrix=mo.Metrix(weight=0.0))(x, y), clean(x, y))
    # λ ~ Beta(α, α): one draw per call, reproducible under torch.manual_seed
    alpha = 0.7
    ma = mo.losses.MultiSimilarityLoss(backend="reference", metrix=mo.Metrix(weight=1.0, alpha=alpha))
    torch.manual_seed(123)
    a = ma(x, y)
    torch.manual_seed(123)
    b = ma(x, y)
    torch.manual_seed(123)
    lam = float(torch.distributions.Beta(torch.tensor(alpha, dtype=torch.float64),
                                         torch.tensor(alpha, dtype=torch.float64)).sample())
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, ma(x, y, lam=lam))
    fixed = mo.losses.MultiSimilarityLoss(backend="reference", metrix=mo.Metrix(weight=1.0, lam=0.25))
    torch.testing.assert_close(fixed(x, y), m1(x, y, lam=0.25))
    torch.testing.assert_close(fixed(x, y, lam=0.5), m1(x, y, lam=0.5))  # the call's λ wins


def test_gradcheck_embedding_level():
    x, y = make_case(CASES[2])
    for key in IN_BATCH:
        if key == "CircleLoss":  # its weights are detached by design: not a true derivative
            continue
        loss = make_loss(key, "pos_neg")
        assert torch.autograd.gradcheck(lambda e: loss(e, y, lam=0.3), (x.detach().requires_grad_(),))
    for name in PROXY:
        clean, hp = proxy_pair(name, x.shape[1], "pos_neg")
        fn = getattr(mo.functional, "proxy_anchor_loss" if name == "ProxyAnchorLoss" else "proxy_nca_loss")
        P = clean.proxies.detach().clone().requires_grad_()
        assert torch.autograd.gradcheck(
            lambda e, p: fn(e, y, proxies=p, backend="reference", lam=0.3,
                            metrix=mo.Metrix(weight=1.0), **hp), (x.detach().requires_grad_(), P))


def test_unsupported_loss_says_which_are():
    x, y = make_case(CASES[1])
    with pytest.raises(NotImplementedError, match="not implemented for TripletMarginLoss.*ContrastiveLoss.*ProxyNCALoss"):
        mo.losses.TripletMarginLoss(backend="reference", metrix=mo.Metrix())(x, y)
    with pytest.raises(NotImplementedError, match="normalize_embeddings=True"):
        mo.losses.ContrastiveLoss(backend="reference", metrix=mo.Metrix(),
                                  distance=mo.distances.LpDistance(normalize_embeddings=False))(x, y)


def test_half_inputs():
    x, y = make_case(CASES[1])
    loss = mo.losses.MultiSimilarityLoss(backend="reference", metrix=mo.Metrix())
    ref = float(loss(x, y, lam=0.5).detach())
    for dt in (torch.float16, torch.bfloat16):
        out = loss(x.detach().to(dt), y, lam=0.5)
        assert out.dtype == torch.float32 and torch.isfinite(out)
        assert abs(float(out) - ref) < 5e-2 * abs(ref)


def test_proxy_nca_normalize_proxies_option():
    """Metrix mixes on the unit sphere and scores against normalised proxies: ProxyNCA++'s
    normalize_proxies=True is the default distance's behaviour, False is refused."""
    x, y = make_case(CASES[0], seed=1)
    torch.manual_seed(0)
    base = mo.losses.ProxyNCALoss(C, x.shape[1], backend="reference", metrix=mo.Metrix(weight=1.0)).double()
    forced = mo.losses.ProxyNCALoss(C, x.shape[1], backend="reference", normalize_proxies=True,
                                    metrix=mo.Metrix(weight=1.0)).double()
    raw = mo.losses.ProxyNCALoss(C, x.shape[1], backend="reference", normalize_proxies=False,
                                 metrix=mo.Metrix(weight=1.0)).double()
    with torch.no_grad():
        forced.proxies.copy_(base.proxies)
        raw.proxies.copy_(base.proxies)
    torch.testing.assert_close(forced(x, y, lam=0.4), base(x, y, lam=0.4))
    with pytest.raises(NotImplementedError, match="normalize_proxies=False"):
        raw(x, y, lam=0.4)
