"""Weighted kNN evaluation of frozen features (InstDisc, Wu et al. 2018), with all labels or a few per class."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def knn_predict(
    query: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 4096,
) -> Tensor:
    """Weighted kNN of InstDisc: each of the ``k`` most cosine-similar bank entries votes for its class with
    weight ``exp(sim / temperature)``; returns the predicted labels ``[M]`` on ``query``'s device.

    query ``[M, D]``, bank ``[N, D]`` (L2-normalised inside), bank_labels ``[N]`` in ``[0, num_classes)``.
    ``k`` is capped at the bank size. Queries go through in chunks of ``chunk_size``, so at most
    ``chunk_size x N`` similarities are held at once; the computation runs on ``bank``'s device.
    """
    if len(bank) == 0:
        raise ValueError("the kNN bank is empty")
    if k < 1 or temperature <= 0 or chunk_size < 1:
        raise ValueError(f"need k >= 1, temperature > 0, chunk_size >= 1; got {k}, {temperature}, {chunk_size}")
    k = min(k, len(bank))
    bank = F.normalize(bank.detach().float(), dim=1)
    bank_labels = bank_labels.to(bank.device).long()
    preds = []
    for chunk in query.detach().split(chunk_size):
        q = F.normalize(chunk.to(bank.device).float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        # Shifting by each row's best similarity rescales that row's weights by one constant, which leaves
        # its vote unchanged and keeps exp() finite at small temperatures.
        weights = ((sim - sim[:, :1]) / temperature).exp()
        votes = torch.zeros(len(q), num_classes, device=bank.device)
        votes.scatter_add_(1, bank_labels[idx], weights)
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds).to(query.device)


def knn_accuracy(
    train_feats: Tensor,
    train_labels: Tensor,
    val_feats: Tensor,
    val_labels: Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
) -> float:
    """Top-1 accuracy (percent) of :func:`knn_predict` on the validation set, with the training set as bank."""
    preds = knn_predict(val_feats, train_feats, train_labels, num_classes, k=k, temperature=temperature)
    return (preds == val_labels.to(preds.device)).float().mean().item() * 100


def fewshot_indices(labels: Tensor, shots: int, seed: int) -> Tensor:
    """Indices of ``shots`` samples of each class, drawn at random without replacement (all of a class that
    has fewer), reproducible from ``seed``. Labels < 0 (unlabelled samples) are never picked."""
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    cpu_labels = labels.detach().cpu()
    generator = torch.Generator().manual_seed(seed)
    picked = []
    for c in cpu_labels[cpu_labels >= 0].unique(sorted=True):
        members = (cpu_labels == c).nonzero().squeeze(1)
        picked.append(members[torch.randperm(len(members), generator=generator)[:shots]])
    if not picked:
        return torch.empty(0, dtype=torch.long, device=labels.device)
    return torch.cat(picked).sort().values.to(labels.device)


def fewshot_mean(
    probe: Callable[[Tensor, Tensor, int], float],
    train_feats: Tensor,
    train_labels: Tensor,
    shots: int,
    seeds: Sequence[int],
) -> float:
    """Mean over ``seeds`` of ``probe(features, labels, seed)`` fitted on that seed's draw of ``shots`` labelled
    samples per class (:func:`fewshot_indices`): the one loop of the few-shot probes."""
    accs = []
    for seed in seeds:
        idx = fewshot_indices(train_labels, shots, seed)
        accs.append(probe(train_feats[idx.to(train_feats.device)], train_labels[idx], seed))
    if not accs:
        raise ValueError("seeds is empty")
    return sum(accs) / len(accs)


def fewshot_knn_accuracy(
    train_feats: Tensor,
    train_labels: Tensor,
    val_feats: Tensor,
    val_labels: Tensor,
    num_classes: int,
    shots: int,
    seeds: Sequence[int] = range(5),
    k: int = 200,
    temperature: float = 0.1,
) -> float:
    """kNN accuracy (percent) with a bank of ``shots`` labelled samples per class, mean over ``seeds``."""
    return fewshot_mean(
        lambda feats, labels, _seed: knn_accuracy(
            feats, labels, val_feats, val_labels, num_classes, k=k, temperature=temperature
        ),
        train_feats,
        train_labels,
        shots,
        seeds,
    )
