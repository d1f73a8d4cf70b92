"""Probes of each stage of the encoder: kNN and few-shot linear accuracy on the globally pooled output of every
stage (ResNet's res2..res5, the small CNN's conv blocks), for the survey's claim that later stages serve better."""

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
        relus = [m for i, m in enumerate(modules) if isinstance(m, nn.ReLU) and i >= 2
                 and isinstance(modules[i - 2], nn.Conv2d)]
        return {f"block{i + 1}": m for i, m in enumerate(relus)}
    raise ValueError(f"no stages known for a {type(backbone).__name__} backbone")


@torch.no_grad()
def stage_features(backbone: nn.Module, transform: nn.Module, loader, device: torch.device) -> tuple[
        dict[str, Tensor], Tensor]:
    """Globally average-pooled features of every stage for every image of ``loader`` (one forward per batch)."""
    stages = encoder_stages(backbone)
    current: dict[str, Tensor] = {}
    hooks = [module.register_forward_hook(lambda _m, _i, out, name=name: current.__setitem__(
        name, out.float().mean(dim=(2, 3)))) for name, module in stages.items()]
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


def evaluate_stages(backbone: nn.Module, transform: nn.Module, datamodule, cfg, device: torch.device) -> dict:
    """Per stage, in percent: ``stage_<name>_knn_acc`` (all labels), ``stage_<name>_knn_acc_<shots>shot`` and
    ``stage_<name>_fewshot_linear_acc_<shots>shot`` (``cfg``: the ``eval`` config group); ``stages`` lists the
    names, shallow to deep."""
    from contrastive.metrics import fewshot_knn_accuracy, fewshot_linear_accuracy, knn_accuracy

    train_loader, val_loader = datamodule.eval_loaders()
    train_feats, yt = stage_features(backbone, transform, train_loader, device)
    val_feats, yv = stage_features(backbone, transform, val_loader, device)
    knn = dict(k=cfg.knn_k, temperature=cfg.knn_temperature)
    seeds, classes = range(cfg.fewshot_seeds), datamodule.num_classes
    out: dict = {"stages": list(train_feats)}
    for name, xt in train_feats.items():
        xv = val_feats[name]
        out[f"stage_{name}_knn_acc"] = round(float(knn_accuracy(xt, yt, xv, yv, classes, **knn)), 2)
        for shots in cfg.shots:
            out[f"stage_{name}_knn_acc_{shots}shot"] = round(float(
                fewshot_knn_accuracy(xt, yt, xv, yv, classes, shots, seeds, **knn)), 2)
            out[f"stage_{name}_fewshot_linear_acc_{shots}shot"] = round(float(
                fewshot_linear_accuracy(xt, yt, xv, yv, classes, shots, seeds)), 2)
    return out
