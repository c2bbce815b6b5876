"""Feature / input-level Metrix: pair selection, the mixing hook, and the mixed loss over
given mixed embeddings (which, fed every pair, must equal the embedding-level closed form)."""
import pytest
import torch
import torch.nn.functional as F

import metrix_ops as mo
from cases import CASE_IDS, CASES, assert_close_vg, make_case
from metrix_ops.mixup import MixedBatch

SCHEMES = ["pos_neg", "anchor_neg", "pos_pos", "neg_neg"]


def all_pairs_batch(y, lam, scheme):
    b = len(y)
    u, w = torch.where(~torch.eye(b, dtype=torch.bool))
    return MixedBatch(u, w, lam, scheme, y[u], y[w])


def materialise(e, mb):
    xh = F.normalize(e, dim=1)
    return mb.lam * xh[mb.src_a] + (1 - mb.lam) * xh[mb.src_b]


@pytest.mark.parametrize("case", CASES[:3] + CASES[3:], ids=CASE_IDS)
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("name", ["ContrastiveLoss", "MultiSimilarityLoss"])
def test_feature_level_with_every_pair_equals_embedding_level(name, scheme, case):
    x, y = make_case(case, seed=9)
    emb = getattr(mo.losses, name)(backend="reference", metrix=mo.Metrix(pairs=scheme, weight=1.0))
    feat = getattr(mo.losses, name)(backend="reference",
                                     metrix=mo.Metrix(level="feature", pairs=scheme, weight=1.0))
    mb = all_pairs_batch(y, 0.35, scheme)
    assert_close_vg(lambda e: emb(e, y, lam=0.35),
                    lambda e: feat(e, y, mixed_embeddings=materialise(e, mb), mixed=mb), x)


@pytest.mark.parametrize("name", ["ProxyAnchorLoss", "ProxyNCALoss"])
def test_proxy_feature_level_equals_embedding_level(name):
    x, y = make_case(CASES[1], seed=2)
    emb = getattr(mo.losses, name)(11, x.shape[1], backend="reference",
                                   metrix=mo.Metrix(weight=1.0)).double()
    feat = getattr(mo.losses, name)(11, x.shape[1], backend="reference",
                                    metrix=mo.Metrix(level="input", weight=1.0)).double()
    with torch.no_grad():
        feat.proxies.copy_(emb.proxies)
    u, w = torch.where(y[:, None] != y[None, :])
    mb = MixedBatch(u, w, 0.6, "pos_neg", y[u], y[w])
    assert_close_vg(lambda e: emb(e, y, lam=0.6),
                    lambda e: feat(e, y, mixed_embeddings=materialise(e, mb), mixed=mb), x)


def test_mix_pairs_pos_neg_hardest():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(12, 5, generator=g)
    y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3, 4, 4, 5])
    h = torch.randn(12, 3, 4, 4, generator=g)
    mb = mo.mixup.mix_pairs(h, y, "pos_neg", lam=0.3, embeddings=emb, max_pairs=1000)
    e = F.normalize(emb, dim=1)
    sim = e @ e.t()
    expected = []
    for a in range(12):
        negs = [j for j in range(12) if y[j] != y[a]]
        hard = max(negs, key=lambda j: float(sim[a, j]))
        pos = [p for p in range(12) if y[p] == y[a] and p != a]
        expected += [(p, hard) for p in pos] if pos else [(a, hard)]
    assert sorted(zip(mb.src_a.tolist(), mb.src_b.tolist())) == sorted(expected)
    assert (mb.labels_a == y[mb.src_a]).all() and (mb.labels_b == y[mb.src_b]).all()
    torch.testing.assert_close(mb.inputs, 0.3 * h[mb.src_a] + 0.7 * h[mb.src_b])
    # the default cap is the batch size
    assert len(mo.mixup.mix_pairs(h, y, "pos_neg", embeddings=emb)) == 12


@pytest.mark.parametrize("scheme", SCHEMES)
def test_mix_pairs_schemes_and_random_negatives(scheme):
    y = torch.tensor([0, 0, 1, 1, 1, 2, 3])
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = mo.mixup.mix_pairs(None, y, scheme, negatives="random", generator=g1, max_pairs=50)
    b = mo.mixup.mix_pairs(None, y, scheme, negatives="random", generator=g2, max_pairs=50)
    assert torch.equal(a.src_a, b.src_a) and torch.equal(a.src_b, b.src_b) and a.lam == b.lam
    assert 0.0 <= a.lam <= 1.0 and len(a) > 0 and (a.src_a != a.src_b).all()
    same = y[a.src_a] == y[a.src_b]
    assert same.all() if scheme == "pos_pos" else (~same).all() or scheme == "neg_neg"


def test_mix_pairs_errors():
    y = torch.tensor([0, 0, 1])
    with pytest.raises(ValueError, match="needs embeddings"):
        mo.mixup.mix_pairs(None, y)
    with pytest.raises(ValueError, match="pairs must be one of"):
        mo.mixup.mix_pairs(None, y, pairs="pos", negatives="random")
    with pytest.raises(ValueError, match="h must be a tensor with 3 rows"):
        mo.mixup.mix_pairs(torch.randn(4, 2), y, negatives="random")


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
    net = TinyCNN().double()
    imgs = torch.randn(8, 1, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    emb = net(imgs)
    mb = mo.mixup.mix_pairs(None, y, embeddings=emb, lam=0.25)
    with mo.mixup.mixing_hook(net.block2, mb):
        mixed_emb = net(imgs)
    h = net.block2(net.block1(imgs))
    expected = net.head((0.25 * h[mb.src_a] + 0.75 * h[mb.src_b]).mean((2, 3)))
    torch.testing.assert_close(mixed_emb, expected)
    assert torch.equal(net(imgs), emb)  # the hook is gone afterwards
    loss = mo.losses.MultiSimilarityLoss(backend="reference", metrix=mo.Metrix(level="feature"))
    out = loss(emb, y, mixed_embeddings=mixed_emb, mixed=mb)
    out.backward()
    assert torch.isfinite(out) and net.block1[0].weight.grad is not None


def test_mixed_embeddings_are_checked():
    x, y = make_case(CASES[1])
    mb = all_pairs_batch(y, 0.5, "pos_neg")
    loss = mo.losses.ContrastiveLoss(backend="reference", metrix=mo.Metrix(level="feature"))
    with pytest.raises(ValueError, match="mixed_embeddings has 3 rows"):
        loss(x, y, mixed_embeddings=torch.randn(3, x.shape[1], dtype=x.dtype), mixed=mb)
    with pytest.raises(ValueError, match="mixed_embeddings and mixed must be given together"):
        loss(x, y, mixed=mb)
