"""Offline linear evaluation: multinomial logistic regression on frozen features.

Features are centred on the training mean and divided by one scalar, the root mean squared norm of the centred
training features. One learning rate then suits every backbone and feature scale, while the geometry the kNN
sees is kept: per-dimension standardisation would blow up near-constant, noisy dimensions, which hurts the
few-shot probes. The map is affine, so it is folded into the returned layer, which applies to raw features.
Weights start at zero and batches are shuffled by a generator seeded from ``seed``: a run is reproducible
and touches no global random state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from contrastive.metrics.knn import fewshot_mean


def train_linear_classifier(
    feats: Tensor,
    labels: Tensor,
    num_classes: int,
    epochs: int = 100,
    lr: float = 3e-2,
    weight_decay: float = 1e-4,
    batch_size: int = 256,
    seed: int = 0,
) -> nn.Linear:
    """Fit ``nn.Linear(D, num_classes)`` by cross-entropy on the rescaled ``feats [N, D]`` (module docstring)
    with Adam (L2 penalty ``weight_decay``) and a cosine learning-rate decay over ``epochs`` passes, on
    ``feats``' device. The returned layer takes raw features and has no gradient."""
    if len(feats) == 0:
        raise ValueError("no training features")
    # Callers may sit under no_grad or inference_mode (evaluation hooks); the fit needs autograd.
    with torch.inference_mode(False), torch.enable_grad():
        x = feats.detach().float()
        y = labels.detach().to(x.device).long()
        mean = x.mean(dim=0)
        scale = (x - mean).pow(2).sum(dim=1).mean().sqrt().clamp_min(1e-12)
        x = (x - mean) / scale

        layer = nn.Linear(x.shape[1], num_classes, device=x.device)
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
        optimizer = torch.optim.Adam(layer.parameters(), lr=lr, weight_decay=weight_decay)
        steps_per_epoch = math.ceil(len(x) / batch_size)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs * steps_per_epoch, 1))
        generator = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            for idx in torch.randperm(len(x), generator=generator).to(x.device).split(batch_size):
                loss = F.cross_entropy(layer(x[idx]), y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()

        with torch.no_grad():
            # W ((f - mean) / scale) + b  ==  (W / scale) f + (b - W mean / scale)
            layer.weight.div_(scale)
            layer.bias.sub_(layer.weight @ mean)
    layer.requires_grad_(False)
    return layer


@torch.no_grad()
def _accuracy(layer: nn.Linear, feats: Tensor, labels: Tensor) -> float:
    preds = layer(feats.to(layer.weight.device).float()).argmax(dim=1)
    return (preds == labels.to(preds.device)).float().mean().item() * 100


def linear_accuracy(
    train_feats: Tensor,
    train_labels: Tensor,
    val_feats: Tensor,
    val_labels: Tensor,
    num_classes: int,
    epochs: int = 100,
    seed: int = 0,
    lr: float = 3e-2,
    weight_decay: float = 1e-4,
    batch_size: int = 256,
) -> float:
    """Top-1 validation accuracy (percent) of :func:`train_linear_classifier` fitted on the training set."""
    layer = train_linear_classifier(
        train_feats,
        train_labels,
        num_classes,
        epochs=epochs,
        lr=lr,
        weight_decay=weight_decay,
        batch_size=batch_size,
        seed=seed,
    )
    return _accuracy(layer, val_feats, val_labels)


def fewshot_linear_accuracy(
    train_feats: Tensor,
    train_labels: Tensor,
    val_feats: Tensor,
    val_labels: Tensor,
    num_classes: int,
    shots: int,
    seeds: Sequence[int] = range(5),
    epochs: int = 100,
    lr: float = 3e-2,
    weight_decay: float = 1e-4,
    batch_size: int = 256,
) -> float:
    """Linear accuracy (percent) when only ``shots`` labelled samples per class are available, mean over
    ``seeds``; each seed draws its own subset (:func:`fewshot_indices`) and seeds its own fit."""
    return fewshot_mean(
        lambda feats, labels, seed: linear_accuracy(
            feats,
            labels,
            val_feats,
            val_labels,
            num_classes,
            epochs=epochs,
            seed=seed,
            lr=lr,
            weight_decay=weight_decay,
            batch_size=batch_size,
        ),
        train_feats,
        train_labels,
        shots,
        seeds,
    )
