"""Zero-shot retrieval splits (the DML protocol of CUB-200 and Cars-196): train on one half
of the classes, evaluate retrieval on the other, unseen half.

- `digits_split`: scikit-learn's bundled 8×8 digits (no download): classes 0–4 train, 5–9 test.
- `image_folder_split`: ROOT/<class>/<image> (CUB-200 style); the first half of the class
  folders in sorted order train, the rest test. Images are read lazily with Pillow.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
# ImageNet statistics: what pretrained torchvision/timm backbones expect
_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class Split:
    train: torch.utils.data.Dataset
    train_labels: torch.Tensor   # 0 .. num_train_classes-1
    test: torch.utils.data.Dataset
    test_labels: torch.Tensor    # 0 .. (number of test classes)-1
    in_channels: int
    image_size: int
    name: str

    @property
    def num_train_classes(self) -> int:
        return int(self.train_labels.max()) + 1 if len(self.train_labels) else 0


def _dense_labels(y: torch.Tensor) -> torch.Tensor:
    """Class ids renumbered 0..C-1 in sorted order (proxy losses index one proxy per class)."""
    return torch.unique(y, return_inverse=True)[1]


def digits_split(train_classes: Sequence[int] = (0, 1, 2, 3, 4)) -> Split:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    y = torch.tensor(d.target, dtype=torch.long)
    is_train = torch.isin(y, torch.tensor(list(train_classes)))
    if is_train.all() or not is_train.any():
        raise ValueError(f"train_classes={list(train_classes)} must name some but not all of 0..9")
    # standardise with the training split's statistics only (the test classes are unseen)
    mean, std = x[is_train].mean(), x[is_train].std()
    x = (x - mean) / std
    return Split(torch.utils.data.TensorDataset(x[is_train]), _dense_labels(y[is_train]),
                 torch.utils.data.TensorDataset(x[~is_train]), _dense_labels(y[~is_train]),
                 in_channels=1, image_size=8, name="digits")


class ImageFiles(torch.utils.data.Dataset):
    """Images read from disk on access, resized to a square, ImageNet-normalised; with
    `flip`, mirrored at random (the usual DML training augmentation)."""

    def __init__(self, paths: List[str], image_size: int, flip: bool):
        self.paths, self.image_size, self.flip = paths, image_size, flip

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            im = im.convert("RGB").resize((self.image_size, self.image_size), Image.BILINEAR)
            x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        x = x.view(self.image_size, self.image_size, 3).permute(2, 0, 1).float() / 255.0
        x = (x - torch.tensor(_MEAN)[:, None, None]) / torch.tensor(_STD)[:, None, None]
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(2)
        return (x,)


def _scan(root: str) -> Tuple[List[str], List[List[str]]]:
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--data {root!r} is not a directory; expected ROOT/<class>/<image>")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    loose = [e.name for e in os.scandir(root)
             if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)]
    if not classes:
        hint = f" (found {len(loose)} images directly in it)" if loose else ""
        raise ValueError(f"--data {root!r} has no class folders{hint}; expected the layout "
                         "ROOT/<class>/<image>, one folder per class (CUB-200 style)")
    files = []
    for c in classes:
        d = os.path.join(root, c)
        imgs = sorted(os.path.join(d, f) for f in os.listdir(d) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not imgs:
            raise ValueError(f"class folder {d!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                             "expected ROOT/<class>/<image>")
        files.append(imgs)
    if len(classes) < 2:
        raise ValueError(f"--data {root!r} has {len(classes)} class folder; the zero-shot split "
                         "needs at least 2 (the first half train, the rest test)")
    return classes, files


def image_folder_split(root: str, image_size: int = 224) -> Split:
    classes, files = _scan(root)
    half = len(classes) // 2

    def part(idx: range, flip: bool):
        paths = [p for c in idx for p in files[c]]
        labels = torch.tensor([k for k, c in enumerate(idx) for _ in files[c]], dtype=torch.long)
        return ImageFiles(paths, image_size, flip), labels

    tr, ytr = part(range(half), flip=True)
    te, yte = part(range(half, len(classes)), flip=False)
    return Split(tr, ytr, te, yte, in_channels=3, image_size=image_size,
                 name=os.path.basename(os.path.normpath(root)))
