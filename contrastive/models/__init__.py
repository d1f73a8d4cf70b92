"""Encoder backbones and projection heads."""

from __future__ import annotations

from typing import Any

import torch
import torchvision
from torch import nn

from contrastive.errors import require

BACKBONES = ("small_cnn", "resnet18", "resnet34", "resnet50")


def check_config(backbone: Any) -> None:
    """The ``backbone`` keys, before anything is built."""
    require(
        backbone.name in BACKBONES,
        f"backbone.name={backbone.name!r} is not known; choose one of {', '.join(BACKBONES)}",
    )
    require(backbone.width >= 1, f"backbone.width={backbone.width} must be >= 1")
    require(backbone.depth >= 1, f"backbone.depth={backbone.depth} must be >= 1")
    check_pooling(backbone.name, backbone.pool_size, backbone.fc_dim)


def check_pooling(name: str, pool_size: int, fc_dim: int) -> None:
    require(pool_size >= 1, f"backbone.pool_size={pool_size} must be >= 1")
    require(fc_dim >= 0, f"backbone.fc_dim={fc_dim} must be >= 0 (0: no fully connected layer)")
    require(
        name == "small_cnn" or (pool_size, fc_dim) == (1, 0),
        f"backbone.pool_size and backbone.fc_dim apply to small_cnn only, not backbone.name={name!r}",
    )


def check_head(layers: int, hidden_dim: int, out_dim: int) -> None:
    """The projection head's keys (``method.proj_*``)."""
    for key, value in (("proj_layers", layers), ("proj_hidden_dim", hidden_dim), ("proj_out_dim", out_dim)):
        require(value >= 1, f"method.{key}={value} must be >= 1")


class SmallCNN(nn.Module):
    """A compact conv net (conv-BN-ReLU blocks, two poolings, average pooling) that trains in minutes on a CPU.

    ``fc_dim > 0`` ends it LeNet-style: the ``pool_size x pool_size`` average-pooled map, flattened, through a
    fully connected layer with BN and ReLU. It keeps where on the image each feature fired, which a global average
    throws away and which tells digits apart (6 from 9): on MNIST it lifts 10-shot kNN far more than width does.
    """

    def __init__(self, in_channels: int = 1, width: int = 32, depth: int = 4, pool_size: int = 1, fc_dim: int = 0):
        super().__init__()
        check_pooling("small_cnn", pool_size, fc_dim)
        layers: list[nn.Module] = []
        channels = in_channels
        for i in range(depth):
            out = width * 2 ** min(i, 2)
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            if i in (0, depth // 2):
                layers.append(nn.MaxPool2d(2))
            channels = out
        layers += [nn.AdaptiveAvgPool2d(pool_size), nn.Flatten()]
        channels *= pool_size**2
        if fc_dim:
            layers += [nn.Linear(channels, fc_dim, bias=False), nn.BatchNorm1d(fc_dim), nn.ReLU(inplace=True)]
            channels = fc_dim
        self.net = nn.Sequential(*layers)
        self.out_dim = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_backbone(
    name: str,
    in_channels: int,
    small_images: bool = True,
    width: int = 32,
    depth: int = 4,
    pool_size: int = 1,
    fc_dim: int = 0,
) -> nn.Module:
    """A backbone with its classifier removed; ``out_dim`` holds the feature dimension.

    ``small_images`` replaces the ResNet stem (7x7/2 conv + max-pool) by a 3x3/1 conv without pooling, the usual
    choice for 32-pixel images.
    """
    require(name in BACKBONES, f"backbone.name={name!r} is not known; choose one of {', '.join(BACKBONES)}")
    if name == "small_cnn":
        return SmallCNN(in_channels, width, depth, pool_size, fc_dim)
    check_pooling(name, pool_size, fc_dim)
    net = getattr(torchvision.models, name)(weights=None)
    if small_images:
        net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    net.out_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net


def backbone_from_config(cfg, in_channels: int) -> nn.Module:
    """:func:`build_backbone` from a ``backbone`` config group (keys added later default, so old checkpoints load)."""
    return build_backbone(
        cfg.name, in_channels, cfg.small_images, cfg.width, cfg.depth, cfg.get("pool_size", 1), cfg.get("fc_dim", 0)
    )


def projection_head(
    in_dim: int, hidden_dim: int, out_dim: int, layers: int, batch_norm: bool = True, final_batch_norm: bool = False
) -> nn.Module:
    """MLP head: ``layers`` linear layers, (BN +) ReLU between them; ``layers=1`` is MoCo v1's linear head,
    ``batch_norm=False`` with 2 layers MoCo v2's Linear-ReLU-Linear. ``final_batch_norm``: the last linear layer
    without bias, then BN with a scale and no offset, as SimCLR's official head ends."""
    check_head(layers, hidden_dim, out_dim)
    modules: list[nn.Module] = []
    dim = in_dim
    for _ in range(layers - 1):
        modules += [nn.Linear(dim, hidden_dim, bias=not batch_norm)]
        if batch_norm:
            modules.append(nn.BatchNorm1d(hidden_dim))
        modules.append(nn.ReLU(inplace=True))
        dim = hidden_dim
    if not final_batch_norm:
        modules.append(nn.Linear(dim, out_dim))
        return nn.Sequential(*modules)
    norm = nn.BatchNorm1d(out_dim)
    norm.bias.requires_grad_(False)  # no offset: the bias stays 0 and no optimiser sees it
    modules += [nn.Linear(dim, out_dim, bias=False), norm]
    return nn.Sequential(*modules)
