"""The training script's parts: the class-balanced sampler, the zero-shot splits (digits
and image folders, with their layout errors), and the models' mixing point."""
import os

import pytest
import torch

import metrix_ops as mo
from metrix_ops.training.data import digits_split, image_folder_split
from metrix_ops.training.models import build_model, small_cnn
from metrix_ops.training.sampler import ClassBalancedBatches


# ---------------------------------------------------------------- sampler
@pytest.mark.parametrize("p,k", [(3, 4), (5, 1), (2, 7)])
def test_batches_are_p_classes_of_k_contiguous(p, k):
    labels = torch.randint(0, 7, (131,), generator=torch.Generator().manual_seed(1))
    s = ClassBalancedBatches(labels, p, k, seed=3)
    batches = list(s)
    assert len(batches) == len(s) == 131 // (p * k)
    for b in batches:
        lab = labels[torch.tensor(b)].view(p, k)
        assert (lab == lab[:, :1]).all()                 # each run of k is one class
        assert len(torch.unique(lab[:, 0])) == p         # p distinct classes


def test_sampler_is_deterministic_per_seed_and_epoch_and_covers_the_data():
    labels = torch.arange(200) % 5
    a, b = ClassBalancedBatches(labels, 5, 8, seed=0), ClassBalancedBatches(labels, 5, 8, seed=0)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)
    assert list(ClassBalancedBatches(labels, 5, 8, seed=1)) != list(b)
    # 5 batches of all 5 classes × 8 = every example exactly once per epoch
    seen = [i for batch in b for i in batch]
    assert sorted(seen) == list(range(200))


def test_class_smaller_than_k_repeats_its_examples():
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1])
    for b in ClassBalancedBatches(labels, 2, 5, seed=0):
        lab = labels[torch.tensor(b)]
        assert (lab == 0).sum() == 5 and set(b) >= {0, 1, 2}


def test_sampler_errors():
    with pytest.raises(ValueError, match="only 2 classes"):
        ClassBalancedBatches(torch.tensor([0, 1, 1]), 3, 2)
    with pytest.raises(ValueError, match="samples_per_class"):
        ClassBalancedBatches(torch.tensor([0, 1, 1]), 1, 0)
    with pytest.raises(ValueError, match="1-D"):
        ClassBalancedBatches(torch.zeros(2, 2), 1, 1)


# ---------------------------------------------------------------- data
def test_digits_split_is_zero_shot():
    from sklearn.datasets import load_digits

    target = torch.tensor(load_digits().target)
    s = digits_split()
    assert len(s.train) == int((target < 5).sum()) and len(s.test) == int((target >= 5).sum())
    assert set(s.train_labels.tolist()) == set(range(5)) == set(s.test_labels.tolist())
    assert s.train[0][0].shape == (1, 8, 8) and s.num_train_classes == 5
    # test images are the digits 5-9 in order: label k of the test split is digit k + 5
    raw = torch.tensor(load_digits().images, dtype=torch.float32)[target >= 5]
    x = torch.stack([s.test[i][0][0] for i in range(len(s.test))])
    assert torch.allclose(torch.corrcoef(torch.stack([x.flatten(), raw.flatten()]))[0, 1],
                          torch.tensor(1.0), atol=1e-6)
    assert (s.test_labels == target[target >= 5] - 5).all()
    with pytest.raises(ValueError, match="train_classes"):
        digits_split(range(10))


def _write_images(root, counts, size=(12, 9)):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for cls, n in counts.items():
        os.makedirs(os.path.join(root, cls), exist_ok=True)
        for i in range(n):
            arr = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(os.path.join(root, cls, f"{i}.png"))


def test_image_folder_split_first_half_of_sorted_classes_trains(tmp_path):
    _write_images(tmp_path, {"003.c": 2, "001.a": 3, "002.b": 1, "004.d": 4, "005.e": 2})
    (tmp_path / "001.a" / "notes.txt").write_text("not an image")
    s = image_folder_split(str(tmp_path), image_size=10)
    assert s.train_labels.tolist() == [0, 0, 0, 1]          # 001.a ×3, 002.b ×1
    assert s.test_labels.tolist() == [0, 0, 1, 1, 1, 1, 2, 2]  # 003.c, 004.d, 005.e
    x = s.test[0][0]
    assert x.shape == (3, 10, 10) and x.dtype == torch.float32
    # ImageNet normalisation of [0, 1] pixels lies within these bounds
    assert x.min() >= -2.2 and x.max() <= 2.7


def test_image_folder_layout_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        image_folder_split(str(tmp_path / "missing"))
    _write_images(tmp_path / "flat", {".": 2})
    with pytest.raises(ValueError, match=r"no class folders \(found 2 images"):
        image_folder_split(str(tmp_path / "flat"))
    os.makedirs(tmp_path / "empty" / "a")
    with pytest.raises(ValueError, match="holds no images"):
        image_folder_split(str(tmp_path / "empty"))
    _write_images(tmp_path / "one", {"a": 2})
    with pytest.raises(ValueError, match="at least 2"):
        image_folder_split(str(tmp_path / "one"))


# ---------------------------------------------------------------- models and the mixing point
@pytest.mark.parametrize("size", [8, 13, 32])
def test_small_cnn_mix_point_is_the_last_block_before_pooling(size):
    torch.manual_seed(0)
    net = small_cnn(3, size, 11).eval()
    x = torch.randn(6, 3, size, size)
    feats = []
    h = net.mix_point.register_forward_hook(lambda m, i, o: feats.append(o))
    emb = net(x)
    h.remove()
    assert emb.shape == (6, 11) and feats[0].ndim == 4 and feats[0].shape[-1] <= 8
    assert torch.allclose(emb, net.embed(feats[0].mean((2, 3))), atol=1e-6)


def test_feature_mixing_of_the_model_equals_mixing_its_features_by_hand():
    torch.manual_seed(0)
    net = small_cnn(1, 8, 5).eval()
    x = torch.randn(7, 1, 8, 8)
    mixed = mo.mixup.MixedBatch(torch.tensor([0, 3, 6]), torch.tensor([1, 1, 2]), 0.3, "pos_neg",
                                torch.tensor([0, 1, 2]), torch.tensor([3, 3, 4]))
    with mo.mixup.mixing_hook(net.mix_point, mixed):
        got = net(x)
    f = net.trunk(x)
    want = net.embed(net.pool(0.3 * f[[0, 3, 6]] + 0.7 * f[[1, 1, 2]]).flatten(1))
    assert got.shape == (3, 5) and torch.allclose(got, want, atol=1e-6)


def test_build_model_errors_and_torchvision_backbone():
    with pytest.raises(ValueError, match="RGB"):
        build_model("resnet18", 1, 8, 4)
    with pytest.raises(ValueError, match="--backbone must be"):
        build_model("vgg_nonsense", 3, 32, 4)
    pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = build_model("resnet18", 3, 32, 9).eval()
    feats = []
    net.mix_point.register_forward_hook(lambda m, i, o: feats.append(o))
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 9)
    assert feats[0].shape == (2, 512, 1, 1)  # layer4 of a ResNet-18
