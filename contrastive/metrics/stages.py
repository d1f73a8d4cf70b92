"""Features of each stage of the encoder: the globally pooled output of every stage (ResNet's res2..res5, the small
CNN's conv blocks), probed by :func:`contrastive.evaluate.evaluate_stages` for the survey's claim that later stages
serve better."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def encoder_stages(backbone: nn.Module) -> dict[str, nn.Module]:
    """Name -> module whose output is a stage's feature map, shallow to deep."""
    if all(hasattr(backbone, f"layer{i}") for i in range(1, 5)):  # torchvision ResNet: res2..res5
        return {f"res{i + 1}": getattr(backbone, f"layer{i}") for i in range(1, 5)}
    net = getattr(backbone, "net", None)
    if isinstance(net, nn.Sequential):  # SmallCNN: each conv-BN-ReLU block ends in its ReLU
        modules = list(net)
        relus = [
            m
            for i, m in enumerate(modules)
            if isinstance(m, nn.ReLU) and i >= 2 and isinstance(modules[i - 2], nn.Conv2d)
        ]
        return {f"block{i + 1}": m for i, m in enumerate(relus)}
    raise ValueError(f"no stages known for a {type(backbone).__name__} backbone")


@torch.no_grad()
def stage_features(
    backbone: nn.Module, transform: nn.Module, loader, device: torch.device
) -> tuple[dict[str, Tensor], Tensor]:
    """Globally average-pooled features of every stage for every image of ``loader`` (one forward per batch)."""
    stages = encoder_stages(backbone)
    current: dict[str, Tensor] = {}
    hooks = [
        module.register_forward_hook(
            lambda _m, _i, out, name=name: current.__setitem__(name, out.float().mean(dim=(2, 3)))
        )
        for name, module in stages.items()
    ]
    feats: dict[str, list[Tensor]] = {name: [] for name in stages}
    labels = []
    was_training = backbone.training
    backbone.eval()
    try:
        for images, y, _ in loader:
            backbone(transform.to(device)(images.to(device, non_blocking=True)))
            for name in stages:
                feats[name].append(current[name])
            labels.append(y.to(device))
    finally:
        for hook in hooks:
            hook.remove()
        backbone.train(was_training)
    return {name: torch.cat(parts) for name, parts in feats.items()}, torch.cat(labels)
