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
