"""Embedding networks with a named mixing point: `net.mix_point` is the module whose output
(the last convolutional block, before pooling — where the Metrix paper mixes features)
`metrix_ops.mixup.mixing_hook` mixes for feature-level Metrix."""
from __future__ import annotations

import math
import os

import torch
from torch import nn


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class EmbeddingNet(nn.Module):
    """trunk (ending at `mix_point`) → global average pool → linear embedding. Nothing with
    batch statistics follows the mixing point, so a mixed batch is embedded exactly as a
    clean one would be."""

    def __init__(self, trunk: nn.Module, mix_point: nn.Module, trunk_dim: int, embedding_dim: int):
        super().__init__()
        self.trunk, self.mix_point = trunk, mix_point
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.embed = nn.Linear(trunk_dim, embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.pool(self.trunk(x)).flatten(1))


def small_cnn(in_channels: int, image_size: int, embedding_dim: int, width: int = 32) -> EmbeddingNet:
    """A few conv blocks for small images (the 8×8 digits); strided stem convs bring larger
    images down to about 8×8 first."""
    layers, c = [], in_channels
    for _ in range(max(0, math.ceil(math.log2(max(image_size, 1) / 8)))):
        layers.append(_conv(c, width, stride=2))
        c = width
    last = _conv(2 * width, 4 * width)
    trunk = nn.Sequential(*layers, _conv(c, width), _conv(width, 2 * width), nn.MaxPool2d(2), last)
    return EmbeddingNet(trunk, last, 4 * width, embedding_dim)


class _TimmFeatures(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_features(x)


def save_trained(net: nn.Module, cfg, in_channels: int, image_size: int, path: str) -> None:
    """The trained network's weights with what rebuilds it (backbone, input shape, embedding
    size), for load_trained."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({"backbone": cfg.backbone, "in_channels": in_channels, "image_size": image_size,
                "embedding_dim": cfg.embedding_dim, "config": cfg.to_dict(),
                "state_dict": net.state_dict()}, path)


def load_trained(path: str, device="cpu") -> EmbeddingNet:
    """The network `metrix-train --save-model PATH` wrote, in eval mode (no pretrained weights
    are downloaded: the file holds all of them)."""
    saved = torch.load(path, map_location=device, weights_only=False)
    net = build_model(saved["backbone"], saved["in_channels"], saved["image_size"],
                      saved["embedding_dim"], pretrained=False)
    net.load_state_dict(saved["state_dict"])
    return net.to(device).eval()


def build_model(backbone: str, in_channels: int, image_size: int, embedding_dim: int,
                pretrained: bool = False) -> EmbeddingNet:
    """`small_cnn`, a torchvision ResNet name (`resnet18`, `resnet50`, ...), or `timm:NAME`."""
    if backbone == "small_cnn":
        return small_cnn(in_channels, image_size, embedding_dim)
    if in_channels != 3:
        raise ValueError(f"--backbone {backbone} takes RGB images; this dataset has "
                         f"{in_channels} channel(s): use --backbone small_cnn")
    if backbone.startswith("timm:"):
        try:
            import timm
        except ImportError as e:
            raise ImportError(f"--backbone {backbone} needs timm (pip install timm)") from e
        model = timm.create_model(backbone[5:], pretrained=pretrained, num_classes=0, global_pool="")
        feats = _TimmFeatures(model)
        return EmbeddingNet(feats, feats, model.num_features, embedding_dim)
    try:
        import torchvision
    except ImportError as e:
        raise ImportError(f"--backbone {backbone} needs torchvision (pip install torchvision)") from e
    if not backbone.startswith("resnet") or not hasattr(torchvision.models, backbone):
        raise ValueError(f"--backbone must be small_cnn, a torchvision ResNet (resnet18, "
                         f"resnet50, ...) or timm:NAME, got {backbone!r}")
    net = getattr(torchvision.models, backbone)(weights="DEFAULT" if pretrained else None)
    trunk = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool,
                          net.layer1, net.layer2, net.layer3, net.layer4)
    return EmbeddingNet(trunk, net.layer4, net.fc.in_features, embedding_dim)
