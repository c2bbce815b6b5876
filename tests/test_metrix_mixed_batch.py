"""Feature / input-level Metrix: pair selection (mix_pairs), the mixing hook, and the mixed
loss over given mixed embeddings — against a materialised loop (membership and soft labels
written out per anchor and mixed example) and, fed every pair, against the embedding-level
closed form."""
import pytest
import torch
import torch.nn.functional as F

import metrix_ops as mo
from cases import CASE_IDS, CASES, assert_close_vg, make_case
from metrix_ops.mixup import MixedBatch
from test_metrix_embedding import (C, IN_BATCH, PROXY, loss_from_candidates, make_loss,
                                   proxy_loss_from_candidates)

SCHEMES = ["pos_neg", "anchor_neg", "pos_pos", "neg_neg"]


def all_pairs_batch(y, lam, scheme):
    b = len(y)
    u, w = torch.where(~torch.eye(b, dtype=torch.bool))
    return MixedBatch(u, w, lam, scheme, y[u], y[w])


def embed_mixes(e, mb):
    """The mixes of the normalised embeddings (feeding them equals embedding-level mixing)."""
    return mb.mix(F.normalize(e, dim=1))


def net(h):
    """A fixed small 'network' from inputs (B × 3 × 2) to embeddings (B × 5)."""
    g = torch.Generator().manual_seed(11)
    W = torch.randn(6, 5, generator=g, dtype=h.dtype)
    f = h.flatten(1)
    return torch.tanh(f @ W) + 0.1 * f[:, :5]


def materialised_feature(key, e, y, mb, mixed_emb):
    """Mixed term over given mixed embeddings, with plain loops over anchors and mixes."""
    xh, V = F.normalize(e, dim=1), F.normalize(mixed_emb, dim=1)
    lam = mb.lam.tolist() if torch.is_tensor(mb.lam) else [mb.lam] * len(mb)
    b, cands = len(y), []
    for a in range(b):
        P = {j for j in range(b) if j != a and y[j] == y[a]}
        N = {j for j in range(b) if y[j] != y[a]}
        rows, labs = [], []
        for k in range(len(mb)):
            u, w = int(mb.src_a[k]), int(mb.src_b[k])
            if mb.pairs == "pos_neg":
                member = (u in P and w in N) or (not P and u == a and w in N)
            elif mb.pairs == "anchor_neg":
                member = u == a and w in N
            elif mb.pairs == "pos_pos":
                member = u in P and w in P and u != w
            else:
                member = u in N and w in N and u != w
            if member:
                rows.append(k)
                labs.append(lam[k] * float(y[u] == y[a]) + (1 - lam[k]) * float(y[w] == y[a]))
        cands.append((V[rows], torch.tensor(labs, dtype=e.dtype)) if rows else None)
    return loss_from_candidates(key, xh, cands)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("key", sorted(IN_BATCH))
def test_feature_level_with_every_pair_equals_embedding_level(key, scheme, case):
    x, y = make_case(case, seed=9)
    emb, feat = make_loss(key, scheme), make_loss(key, scheme, level="feature")
    mb = all_pairs_batch(y, 0.35, scheme)
    assert_close_vg(lambda e: emb(e, y, lam=0.35),
                    lambda e: feat(e, y, mixed_embeddings=embed_mixes(e, mb), mixed=mb), x)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("key", sorted(IN_BATCH))
def test_feature_level_equals_materialised(key, scheme, case):
    """Pairs chosen by mix_pairs (hardest and random negatives, a cap), mixed inputs run
    through a network; one λ, then a per-row λ."""
    _, y = make_case(case, seed=2)
    g = torch.Generator().manual_seed(4)
    h = torch.randn(len(y), 3, 2, dtype=torch.float64, generator=g)
    clean, loss = make_loss(key), make_loss(key, scheme, level="input")
    for negatives, cap in (("hardest", None), ("random", 5)):
        mb = mo.mixup.mix_pairs(None, y, scheme, lam=0.3, negatives=negatives, max_pairs=cap,
                                embeddings=net(h).detach(), generator=torch.Generator().manual_seed(1))
        per_row = MixedBatch(mb.src_a, mb.src_b, torch.rand(len(mb), generator=g, dtype=torch.float64),
                             scheme, mb.labels_a, mb.labels_b)
        for m in (mb, per_row):
            v = assert_close_vg(
                lambda t: loss(net(t), y, mixed_embeddings=net(m.mix(t)), mixed=m) - clean(net(t), y),
                lambda t: materialised_feature(key, net(t), y, m, net(m.mix(t))), h)
            assert torch.isfinite(v)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("name", sorted(PROXY))
def test_proxy_feature_level(name, scheme):
    x, y = make_case(CASES[1], seed=2)
    hp = PROXY[name]
    torch.manual_seed(0)
    emb = getattr(mo.losses, name)(C, x.shape[1], backend="reference", **hp,
                                   metrix=mo.Metrix(pairs=scheme, weight=1.0)).double()
    feat = getattr(mo.losses, name)(C, x.shape[1], backend="reference", **hp,
                                    metrix=mo.Metrix(level="feature", pairs=scheme, weight=1.0)).double()
    with torch.no_grad():
        feat.proxies.copy_(emb.proxies)
    # every pair of the scheme's kind (different labels; same labels for pos_pos): the closed form
    u, w = torch.where((y[:, None] == y[None, :]) == (scheme == "pos_pos"))
    keep = u != w
    mb = MixedBatch(u[keep], w[keep], 0.6, scheme, y[u[keep]], y[w[keep]])
    assert_close_vg(lambda e: emb(e, y, lam=0.6),
                    lambda e: feat(e, y, mixed_embeddings=embed_mixes(e, mb), mixed=mb), x)
    # a mix_pairs selection with per-row λ, against the materialised soft-target form
    sel = mo.mixup.mix_pairs(None, y, scheme, embeddings=x.detach(), lam=0.5)
    lam = torch.linspace(0.1, 0.9, len(sel), dtype=torch.float64)
    m = MixedBatch(sel.src_a, sel.src_b, lam, scheme, sel.labels_a, sel.labels_b)
    P = emb.proxies.detach().clone()
    clean = getattr(mo.losses, name)(C, x.shape[1], backend="reference", **hp).double()
    with torch.no_grad():
        clean.proxies.copy_(P)
    oh = F.one_hot(y, C).double()
    Y = lam[:, None] * oh[m.src_a] + (1 - lam[:, None]) * oh[m.src_b]
    assert_close_vg(lambda e: feat(e, y, mixed_embeddings=embed_mixes(e, m) * 2.0, mixed=m) - clean(e, y),
                    lambda e: proxy_loss_from_candidates(name, hp, F.normalize(embed_mixes(e, m), dim=1), Y, P), x)


def test_empty_mixed_batch_gives_zero_with_a_graph():
    x, y = make_case(CASES[4])  # one class: no negative to mix with
    mb = mo.mixup.mix_pairs(None, y, "pos_neg", embeddings=x.detach(), lam=0.5)
    assert len(mb) == 0
    loss = mo.losses.MultiSimilarityLoss(backend="reference", metrix=mo.Metrix(level="feature", weight=1.0))
    out = loss(x, y, mixed_embeddings=x.new_zeros(0, x.shape[1]), mixed=mb)
    torch.testing.assert_close(out, mo.losses.MultiSimilarityLoss(backend="reference")(x, y))
    out.backward()


def hardest_negative(sim, y, a, exclude=()):
    negs = [j for j in range(len(y)) if y[j] != y[a] and j not in exclude]
    return max(negs, key=lambda j: float(sim[a, j]))


def test_mix_pairs_pos_neg_hardest():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(12, 5, generator=g)
    y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3, 4, 4, 5])
    h = torch.randn(12, 3, 4, 4, generator=g)
    mb = mo.mixup.mix_pairs(h, y, "pos_neg", lam=0.3, embeddings=emb, max_pairs=1000)
    e = F.normalize(emb, dim=1)
    sim = e @ e.t()
    expected = set()
    for a in range(12):
        pos = [p for p in range(12) if y[p] == y[a] and p != a]
        hard = hardest_negative(sim, y, a)
        # the closest negative by Euclidean distance of the normalised embeddings, too
        assert hard == min((j for j in range(12) if y[j] != y[a]), key=lambda j: float((e[a] - e[j]).norm()))
        expected |= {(p, hard) for p in pos} if pos else {(a, hard)}
    got = list(zip(mb.src_a.tolist(), mb.src_b.tolist()))
    assert len(got) == len(set(got)) and set(got) == expected  # each distinct mix once
    assert torch.equal(mb.labels_a, y[mb.src_a]) and torch.equal(mb.labels_b, y[mb.src_b])
    assert (mb.labels_a != mb.labels_b).all()
    torch.testing.assert_close(mb.inputs, 0.3 * h[mb.src_a] + 0.7 * h[mb.src_b])
    # the cap: a uniform subset of the uncapped mixes; the default cap is the batch size
    for cap in (1, 5, None):
        capped = mo.mixup.mix_pairs(h, y, "pos_neg", lam=0.3, embeddings=emb, max_pairs=cap)
        pairs = set(zip(capped.src_a.tolist(), capped.src_b.tolist()))
        assert len(capped) == len(pairs) == (12 if cap is None else cap) and pairs <= expected
        torch.testing.assert_close(capped.inputs, 0.3 * h[capped.src_a] + 0.7 * h[capped.src_b])


def test_mix_pairs_anchor_neg_and_neg_neg_hardest():
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(9, 4, generator=g)
    y = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4])
    e = F.normalize(emb, dim=1)
    sim = e @ e.t()
    an = mo.mixup.mix_pairs(None, y, "anchor_neg", embeddings=emb, max_pairs=100)
    assert sorted(zip(an.src_a.tolist(), an.src_b.tolist())) == \
        [(a, hardest_negative(sim, y, a)) for a in range(9)]
    nn = mo.mixup.mix_pairs(None, y, "neg_neg", embeddings=emb, max_pairs=100)
    expected = set()
    for a in range(9):
        n1 = hardest_negative(sim, y, a)
        expected.add((n1, hardest_negative(sim, y, a, exclude=(n1,))))
    assert set(zip(nn.src_a.tolist(), nn.src_b.tolist())) == expected and len(nn) == len(expected)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_mix_pairs_random_negatives(scheme):
    y = torch.tensor([0, 0, 1, 1, 1, 2, 3])
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = mo.mixup.mix_pairs(None, y, scheme, negatives="random", generator=g1, max_pairs=50)
    b = mo.mixup.mix_pairs(None, y, scheme, negatives="random", generator=g2, max_pairs=50)
    assert torch.equal(a.src_a, b.src_a) and torch.equal(a.src_b, b.src_b) and a.lam == b.lam
    assert 0.0 <= a.lam <= 1.0 and len(a) > 0 and (a.src_a != a.src_b).all()
    same = y[a.src_a] == y[a.src_b]
    if scheme == "pos_pos":  # every ordered positive pair, no embeddings needed
        assert same.all() and len(a) == 2 + 6
    elif scheme == "neg_neg":  # two distinct negatives of one anchor: any labels between them
        anchors_of = [{k for k in range(7) if y[k] != y[int(u)] and y[k] != y[int(w)]}
                      for u, w in zip(a.src_a, a.src_b)]
        assert all(anchors_of)
    else:
        assert (~same).all()
    # λ from Beta(α, α), one per call, reproducible under torch.manual_seed without a generator
    torch.manual_seed(3)
    l1 = mo.mixup.mix_pairs(None, y, scheme, negatives="random", alpha=0.5).lam
    torch.manual_seed(3)
    l2 = mo.mixup.mix_pairs(None, y, scheme, negatives="random", alpha=0.5).lam
    assert l1 == l2


def test_mix_pairs_edge_batches():
    one = torch.tensor([3])
    for scheme in SCHEMES:
        mb = mo.mixup.mix_pairs(torch.randn(1, 2), one, scheme, lam=0.5, embeddings=torch.randn(1, 2))
        assert len(mb) == 0 and mb.inputs.shape == (0, 2)
    ints = torch.arange(24, dtype=torch.uint8).reshape(4, 6)  # raw integer inputs mix to float
    mb = mo.mixup.mix_pairs(ints, torch.tensor([0, 0, 1, 1]), "pos_pos", lam=0.25)
    torch.testing.assert_close(mb.inputs, 0.25 * ints[mb.src_a].float() + 0.75 * ints[mb.src_b].float())


def test_mix_pairs_errors():
    y = torch.tensor([0, 0, 1])
    with pytest.raises(ValueError, match="needs embeddings"):
        mo.mixup.mix_pairs(None, y)
    with pytest.raises(ValueError, match="pairs must be one of"):
        mo.mixup.mix_pairs(None, y, pairs="pos", negatives="random")
    with pytest.raises(ValueError, match="h must be a tensor with 3 rows"):
        mo.mixup.mix_pairs(torch.randn(4, 2), y, negatives="random")
    with pytest.raises(ValueError, match="max_pairs must be >= 1"):
        mo.mixup.mix_pairs(None, y, negatives="random", max_pairs=0)
    with pytest.raises(ValueError, match="lam must be in"):
        mo.mixup.mix_pairs(None, y, negatives="random", lam=1.5)
    with pytest.raises(ValueError, match="embeddings has 2 rows"):
        mo.mixup.mix_pairs(None, y, embeddings=torch.randn(2, 4))


class TinyCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.block1 = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU())
        self.block2 = torch.nn.Sequential(torch.nn.Conv2d(4, 6, 3, padding=1), torch.nn.ReLU())
        self.head = torch.nn.Linear(6, 5)

    def forward(self, x):
        h = self.block2(self.block1(x))
        return self.head(h.mean((2, 3)))


def test_mixing_hook_mixes_the_chosen_activation():
    torch.manual_seed(0)
    net_ = TinyCNN().double()
    imgs = torch.randn(8, 1, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    emb = net_(imgs)
    mb = mo.mixup.mix_pairs(None, y, embeddings=emb, lam=0.25)
    with mo.mixup.mixing_hook(net_.block2, mb):
        mixed_emb = net_(imgs)
    h = net_.block2(net_.block1(imgs))
    expected = net_.head((0.25 * h[mb.src_a] + 0.75 * h[mb.src_b]).mean((2, 3)))
    torch.testing.assert_close(mixed_emb, expected)
    assert torch.equal(net_(imgs), emb)  # the hook is gone afterwards
    # per-row λ, on the first block this time
    lam = torch.linspace(0, 1, len(mb), dtype=torch.float64)
    per_row = MixedBatch(mb.src_a, mb.src_b, lam, mb.pairs, mb.labels_a, mb.labels_b)
    with mo.mixup.mixing_hook(net_.block1, per_row):
        out = net_(imgs)
    h1 = net_.block1(imgs)
    mixed_h1 = lam[:, None, None, None] * h1[mb.src_a] + (1 - lam[:, None, None, None]) * h1[mb.src_b]
    torch.testing.assert_close(out, net_.head(net_.block2(mixed_h1).mean((2, 3))))
    # the mixed loss trains the network through both passes
    loss = mo.losses.MultiSimilarityLoss(backend="reference", metrix=mo.Metrix(level="feature"))
    total = loss(emb, y, mixed_embeddings=mixed_emb, mixed=mb)
    total.backward()
    assert torch.isfinite(total) and net_.block1[0].weight.grad.abs().sum() > 0


def test_mixing_hook_is_removed_on_error():
    net_ = TinyCNN().double()
    mb = mo.mixup.mix_pairs(None, torch.tensor([0, 0, 1, 1]), "pos_pos", lam=0.5)
    with pytest.raises(RuntimeError, match="boom"):
        with mo.mixup.mixing_hook(net_.block2, mb):
            raise RuntimeError("boom")
    assert not net_.block2._forward_hooks
    with pytest.raises(ValueError, match="hooked activation has 2 rows"):
        with mo.mixup.mixing_hook(net_.block2, mb):
            net_(torch.randn(2, 1, 6, 6, dtype=torch.float64))
    with pytest.raises(TypeError, match="must be a MixedBatch"):
        with mo.mixup.mixing_hook(net_.block2, (mb.src_a, mb.src_b)):
            pass


def test_mixed_inputs_are_checked():
    x, y = make_case(CASES[1])
    mb = all_pairs_batch(y, 0.5, "pos_neg")
    loss = mo.losses.ContrastiveLoss(backend="reference", metrix=mo.Metrix(level="feature"))
    good = embed_mixes(x, mb).detach()
    with pytest.raises(ValueError, match="mixed_embeddings has 3 rows"):
        loss(x, y, mixed_embeddings=torch.randn(3, x.shape[1], dtype=x.dtype), mixed=mb)
    with pytest.raises(ValueError, match="mixed_embeddings has dim 4"):
        loss(x, y, mixed_embeddings=good[:, :4], mixed=mb)
    with pytest.raises(ValueError, match="mixed_embeddings must be 2-D"):
        loss(x, y, mixed_embeddings=good[:, 0], mixed=mb)
    with pytest.raises(ValueError, match="mixed_embeddings and mixed must be given together"):
        loss(x, y, mixed=mb)
    with pytest.raises(TypeError, match="mixed must be a metrix_ops.mixup.MixedBatch"):
        loss(x, y, mixed_embeddings=good, mixed=(mb.src_a, mb.src_b))
    with pytest.raises(ValueError, match="built with pairs='pos_pos'"):
        pp = all_pairs_batch(y, 0.5, "pos_pos")
        loss(x, y, mixed_embeddings=good, mixed=pp)
    with pytest.raises(ValueError, match="built for other labels"):
        loss(x, (y + 1) % 6, mixed_embeddings=good, mixed=mb)
    with pytest.raises(ValueError, match="outside the batch"):
        loss(x[:5], y[:5], mixed_embeddings=good, mixed=mb)
    with pytest.raises(ValueError, match="needs mixed_embeddings"):
        loss(x, y)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="mixed_embeddings is on"):
            loss(x, y, mixed_embeddings=good.cuda(), mixed=mb)


def test_mixed_batch_validates():
    i = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="pairs must be one of"):
        MixedBatch(i, i, 0.5, "posneg", i, i)
    with pytest.raises(ValueError, match="lam must be in"):
        MixedBatch(i, i, 1.5, "pos_neg", i, i)
    with pytest.raises(ValueError, match="per-row MixedBatch.lam"):
        MixedBatch(i, i, torch.rand(3), "pos_neg", i, i)
    with pytest.raises(ValueError, match="equal lengths"):
        MixedBatch(i, i[:1], 0.5, "pos_neg", i, i)
    with pytest.raises(TypeError, match="1-D integer tensor"):
        MixedBatch(i.float(), i, 0.5, "pos_neg", i, i)
    assert MixedBatch(i, i, torch.tensor(0.25), "pos_neg", i, i).lam == 0.25
    soft = MixedBatch(i, i.flip(0), torch.tensor([0.2, 0.9]), "pos_neg", i, i.flip(0)).soft_labels(3)
    torch.testing.assert_close(soft, torch.tensor([[0.2, 0.8, 0.0], [0.1, 0.9, 0.0]]))
