"""Bad input gets a clear ValueError/TypeError naming the argument, for every loss."""
import inspect

import pytest
import torch

import metrix_ops as mo
from metrix_ops.losses.base import BaseMetricLoss

D = 6
LOSSES = sorted(n for n, c in vars(mo.losses).items()
                if inspect.isclass(c) and issubclass(c, BaseMetricLoss) and c.loss_name)


def make(name, **kw):
    cls = getattr(mo.losses, name)
    params = inspect.signature(cls.__init__).parameters
    if "num_classes" in params:
        kw.update(num_classes=4, embedding_size=D)
    return cls(backend="reference", **kw)


def good():
    return torch.randn(8, D), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])


BAD = [
    ("rank", lambda x, y: (x[None], y), ValueError, "embeddings must be 2-D"),
    ("not_tensor", lambda x, y: (x.tolist(), y), TypeError, "embeddings must be a torch.Tensor"),
    ("int_embeddings", lambda x, y: (x.long(), y), TypeError, "embeddings must be a floating"),
    ("nan", lambda x, y: (x.index_fill(0, torch.tensor([2]), float("nan")), y), ValueError, "NaN or Inf"),
    ("inf", lambda x, y: (x.index_fill(0, torch.tensor([1]), float("inf")), y), ValueError, "NaN or Inf"),
    ("fractional_labels", lambda x, y: (x, y.float() + 0.5), ValueError,
     "labels must hold class ids: float labels are taken when every value is a whole number"),
    ("nan_labels", lambda x, y: (x, y.float().index_fill(0, torch.tensor([3]), float("nan"))),
     ValueError, "labels must hold class ids"),
    ("bool_labels", lambda x, y: (x, y > 1), TypeError, "labels must hold integer"),
    ("labels_rank", lambda x, y: (x, y[:, None]), ValueError, "labels must be 1-D"),
    ("length", lambda x, y: (x, y[:-1]), ValueError, "labels has 7 entries but there are 8"),
]


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("bad", BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_the_argument(name, bad):
    _, corrupt, exc, msg = bad
    x, y = corrupt(*good())
    with pytest.raises(exc, match=msg):
        make(name)(x, y)


@pytest.mark.parametrize("name", LOSSES)
def test_labels_on_another_device(name):
    x, y = good()
    fake_device_labels = torch.empty(8, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match="labels is on meta"):
        make(name)(x, fake_device_labels)


@pytest.mark.parametrize("name", LOSSES)
def test_meta_embeddings_are_named(name):
    """meta tensors have shapes but no data: one ValueError naming the argument, not the
    "Cannot copy out of meta tensor" of the data checks' read"""
    x, y = good()
    with pytest.raises(ValueError, match="embeddings is on the meta device"):
        make(name)(x.to("meta"), y.to("meta"))
    if name not in ("NPairsLoss", "ProxyAnchorLoss", "ProxyNCALoss"):  # (no ref_emb)
        with pytest.raises(ValueError, match="ref_emb is on the meta device"):
            make(name)(x, y, ref_emb=x.to("meta"), ref_labels=y)


def test_ref_emb_checks():
    x, y = good()
    loss = mo.losses.ContrastiveLoss(backend="reference")
    with pytest.raises(ValueError, match="ref_emb has embedding_dim"):
        loss(x, y, ref_emb=torch.randn(5, D + 1), ref_labels=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="ref_labels has 4 entries"):
        loss(x, y, ref_emb=torch.randn(5, D), ref_labels=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="ref_labels is required"):
        loss(x, y, ref_emb=torch.randn(5, D))
    with pytest.raises(ValueError, match="ref_labels was given without ref_emb"):
        loss(x, y, ref_labels=y)


def test_indices_tuple_checks():
    x, y = good()
    loss = mo.losses.ContrastiveLoss(backend="reference")
    with pytest.raises(ValueError, match="indices_tuple must be a tuple of 3"):
        loss(x, y, (torch.tensor([0]),))
    with pytest.raises(ValueError, match=r"indices_tuple\[1\] holds indices outside"):
        loss(x, y, (torch.tensor([0]), torch.tensor([8]), torch.tensor([2])))
    with pytest.raises(TypeError, match=r"indices_tuple\[2\] must be a 1-D integer"):
        loss(x, y, (torch.tensor([0]), torch.tensor([1]), torch.tensor([2.0])))


def test_option_checks():
    x, y = good()
    with pytest.raises(ValueError, match="backend must be one of"):
        mo.losses.ContrastiveLoss(backend="gpu")(x, y)
    with pytest.raises(ValueError, match="Metrix pairs must be one of"):
        mo.Metrix(pairs="pos")
    with pytest.raises(ValueError, match="Expansion n_points"):
        mo.Expansion(n_points=-1)
    with pytest.raises(ValueError, match="lam must be in"):
        mo.losses.ContrastiveLoss(backend="reference", metrix=mo.Metrix())(x, y, lam=1.5)
    with pytest.raises(TypeError, match="metrix must be metrix_ops.Metrix"):
        mo.losses.ContrastiveLoss(backend="reference", metrix={"pairs": "pos_neg"})(x, y)
    with pytest.raises(ValueError, match="needs mixed_embeddings"):
        mo.losses.ContrastiveLoss(backend="reference", metrix=mo.Metrix(level="feature"))(x, y)


@pytest.mark.parametrize("backend", ["reference", "cpu", "auto"])
@pytest.mark.parametrize("name", ["ProxyAnchorLoss", "ProxyNCALoss"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_proxies(name, backend, bad):
    """The proxies are checked with the embeddings (one host read), on every backend and
    with Metrix: a NaN or Inf weight is an error naming them, not a NaN loss."""
    x, y = good()
    for metrix in (None, mo.Metrix(lam=0.4)):
        loss = getattr(mo.losses, name)(4, D, backend=backend, metrix=metrix)
        loss.proxies.data[1, 2] = bad
        with pytest.raises(ValueError, match="proxies contains NaN or Inf"):
            loss(x, y)


@pytest.mark.parametrize("name", ["ProxyAnchorLoss", "ProxyNCALoss"])
def test_proxy_constructor_and_embedding_size(name):
    cls = getattr(mo.losses, name)
    with pytest.raises(TypeError, match="num_classes must be an int, got float"):
        cls(3.0, D)
    with pytest.raises(TypeError, match="embedding_size must be an int, got bool"):
        cls(3, True)
    x, y = good()
    with pytest.raises(ValueError, match=rf"proxies must be \(num_classes, {D}\).*got \(4, 3\)"
                       ".*embedding_size"):
        cls(4, 3, backend="reference")(x, y)


@pytest.mark.parametrize("backend", ["reference", "cpu", "auto"])
def test_ref_emb_dtype(backend):
    """ref_emb in the embeddings' dtype; half precision is computed in fp32, so a half and a
    fp32 tensor meet there (either way round) and give the fp32 numbers."""
    x, y = good()
    r, ry = torch.randn(5, D), torch.tensor([0, 1, 2, 3, 3])
    loss = mo.losses.MultiSimilarityLoss(backend=backend)
    with pytest.raises(ValueError, match="ref_emb has dtype torch.float64 but embeddings has "
                                         "torch.float32"):
        loss(x, y, ref_emb=r.double(), ref_labels=ry)
    with pytest.raises(ValueError, match="ref_emb has dtype torch.float32 but embeddings has "
                                         "torch.float64"):
        loss(x.double(), y, ref_emb=r, ref_labels=ry)
    want = loss(x.half().float(), y, ref_emb=r, ref_labels=ry)
    torch.testing.assert_close(loss(x.half(), y, ref_emb=r, ref_labels=ry), want)
    want = loss(x, y, ref_emb=r.bfloat16().float(), ref_labels=ry)
    torch.testing.assert_close(loss(x, y, ref_emb=r.bfloat16(), ref_labels=ry), want)


def test_metrix_and_expansion_need_labels():
    """An indices_tuple does not say which pairs share a class, which both options need."""
    x, _ = good()
    tup = (torch.tensor([0, 2]), torch.tensor([1, 3]), torch.tensor([4, 5]))
    with pytest.raises(ValueError, match="labels is required with metrix="):
        mo.losses.MultiSimilarityLoss(metrix=mo.Metrix(lam=0.3))(x, None, indices_tuple=tup)
    with pytest.raises(ValueError, match="labels is required with expansion="):
        mo.losses.TripletMarginLoss(expansion=mo.Expansion())(x, None, indices_tuple=tup)
    with pytest.raises(ValueError, match="labels is required with metrix="):
        mo.losses.ContrastiveLoss(metrix=mo.Metrix(lam=0.3))(x, None)


HYPER = [("MultiSimilarityLoss", {"alpha": 0}, "alpha must be finite and > 0"),
         ("MultiSimilarityLoss", {"beta": -1.0}, "beta must be finite and > 0"),
         ("MultiSimilarityLoss", {"alpha": float("nan")}, "alpha must be finite"),
         ("NTXentLoss", {"temperature": 0}, "temperature must be finite and > 0"),
         ("SupConLoss", {"temperature": float("inf")}, "temperature must be finite and > 0"),
         ("TripletMarginLoss", {"margin": float("inf")}, "margin must be finite")]


@pytest.mark.parametrize("backend", ["reference", "cpu", "auto"])
@pytest.mark.parametrize("name,kw,msg", HYPER, ids=[f"{h[0]}-{list(h[1])[0]}" for h in HYPER])
def test_degenerate_hyper_parameters(name, kw, msg, backend):
    """One error on every backend, where the reference gave inf or NaN and the CPU op
    refused (or the reverse); the functional API too."""
    x, y = good()
    with pytest.raises(ValueError, match=f"{name}'s {msg}"):
        getattr(mo.losses, name)(backend=backend, **kw)(x, y)
    fn = getattr(mo.functional, {"MultiSimilarityLoss": "multi_similarity_loss",
                                 "NTXentLoss": "ntxent_loss", "SupConLoss": "supcon_loss",
                                 "TripletMarginLoss": "triplet_margin_loss"}[name])
    with pytest.raises(ValueError, match=f"{name}'s {msg}"):
        fn(x, y, backend=backend, **kw)


def test_refusals_name_the_call():
    """An explicit fused backend that has no op for a call names what the call asks (its
    distance, hyper-parameters, options); a configuration no backend takes gets the
    reference's own error first."""
    x, y = good()
    loss = mo.losses.TripletMarginLoss(backend="cpu", triplets_per_anchor=2)
    with pytest.raises(NotImplementedError, match=r"does not cover this TripletMarginLoss call "
                                                  r"\(distance=LpDistance\(normalize_embeddings"
                                                  r"=True.*triplets_per_anchor=2\)"):
        loss(x, y)
    with pytest.raises(NotImplementedError, match="Embedding Expansion is implemented for"):
        mo.losses.ContrastiveLoss(backend="cpu", expansion=mo.Expansion())(x, y)
