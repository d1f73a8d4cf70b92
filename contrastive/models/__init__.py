"""Encoder backbones and projection heads."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

BACKBONES = ("small_cnn", "resnet18", "resnet34", "resnet50")


class SmallCNN(nn.Module):
    """A compact conv net (conv-BN-ReLU blocks, two poolings, global average) that trains in minutes on a CPU."""

    def __init__(self, in_channels: int = 1, width: int = 32, depth: int = 4):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for i in range(depth):
            out = width * 2 ** min(i, 2)
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            if i in (0, depth // 2):
                layers.append(nn.MaxPool2d(2))
            channels = out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.net = nn.Sequential(*layers)
        self.out_dim = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_backbone(name: str, in_channels: int, small_images: bool = True, width: int = 32, depth: int = 4) -> nn.Module:
    """A backbone with its classifier removed; ``out_dim`` holds the feature dimension.

    ``small_images`` replaces the ResNet stem (7x7/2 conv + max-pool) by a 3x3/1 conv without pooling, the usual
    choice for 32-pixel images.
    """
    if name == "small_cnn":
        return SmallCNN(in_channels, width, depth)
    if name not in BACKBONES:
        raise ValueError(f"backbone.name={name!r} is not known; choose one of {', '.join(BACKBONES)}")
    net = getattr(torchvision.models, name)(weights=None)
    if small_images:
        net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    net.out_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net


def projection_head(in_dim: int, hidden_dim: int, out_dim: int, layers: int, batch_norm: bool = True) -> nn.Module:
    """MLP head: ``layers`` linear layers, BN + ReLU between them; ``layers=1`` is MoCo v1's linear head."""
    if layers < 1:
        raise ValueError(f"method.proj_layers must be >= 1, got {layers}")
    modules: list[nn.Module] = []
    dim = in_dim
    for _ in range(layers - 1):
        modules += [nn.Linear(dim, hidden_dim, bias=not batch_norm)]
        if batch_norm:
            modules.append(nn.BatchNorm1d(hidden_dim))
        modules.append(nn.ReLU(inplace=True))
        dim = hidden_dim
    modules.append(nn.Linear(dim, out_dim))
    return nn.Sequential(*modules)
