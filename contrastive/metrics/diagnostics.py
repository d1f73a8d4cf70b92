"""Representation and dictionary diagnostics: alignment / uniformity (Wang & Isola 2020), false negatives
among the negatives a method contrasts against, and embedding spread (collapse)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def alignment(z1: Tensor, z2: Tensor, alpha: float = 2.0) -> Tensor:
    """Mean ``||f(x) - f(y)||^alpha`` over the positive pairs ``(z1[i], z2[i])``; lower is better aligned.
    Inputs ``[N, D]`` are L2-normalised inside."""
    z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    return (z1 - z2).norm(dim=1).pow(alpha).mean()


def uniformity(z: Tensor, t: float = 2.0) -> Tensor:
    """``log mean_{i<j} exp(-t ||z_i - z_j||^2)`` over the rows of ``z [N, D]`` (N >= 2), L2-normalised inside:
    0 when all points coincide, more negative the more evenly they cover the sphere."""
    if len(z) < 2:
        raise ValueError("uniformity needs at least two points")
    z = F.normalize(z.float(), dim=1)
    # On the unit sphere ||a - b||^2 = 2 - 2 a.b: no square root, so no NaN gradient for coinciding points.
    sq_dist = (2 - 2 * z @ z.T).clamp_min(0)
    i, j = torch.triu_indices(len(z), len(z), offset=1, device=z.device)
    pairs = -t * sq_dist[i, j]
    return torch.logsumexp(pairs, dim=0) - math.log(len(pairs))


def false_negative_rate(query_labels: Tensor, negative_labels: Tensor) -> Tensor:
    """Share of a query's negatives that carry the query's own class, mean over queries.

    query_labels ``[N]``; negative_labels ``[K]`` shared by all queries or ``[N, K]`` per query. Labels < 0
    (unknown, e.g. an empty bank slot) are left out of the count; a query with an unknown label or without
    any known negative is left out of the mean (NaN if no query remains).
    """
    if negative_labels.dim() == 1:
        negative_labels = negative_labels.unsqueeze(0).expand(len(query_labels), -1)
    elif negative_labels.dim() != 2 or len(negative_labels) != len(query_labels):
        raise ValueError(
            f"negative_labels must be [K] or [N, K] with N = {len(query_labels)}, got {tuple(negative_labels.shape)}"
        )
    query_labels = query_labels.to(negative_labels.device)
    known = negative_labels >= 0
    same = (negative_labels == query_labels.unsqueeze(1)) & known
    counted = known.sum(dim=1)
    keep = ((counted > 0) & (query_labels >= 0)).float()
    rate = same.sum(dim=1).float() / counted.clamp_min(1)
    return (rate * keep).sum() / keep.sum()  # weights, not a boolean index: no device sync in a training step


def embedding_std(z: Tensor) -> Tensor:
    """Mean over dimensions of the per-dimension standard deviation (over the batch) of L2-normalised
    ``z [B, D]``: 0 for collapsed embeddings, about ``1/sqrt(D)`` for ones spread over the sphere."""
    return F.normalize(z.float(), dim=1).std(dim=0, correction=0).mean()
