"""Contrastive losses as pure functions, independent of the training loop.

Every instance-contrastive method (SimCLR, memory bank, MoCo, and the cells between them) goes through
:func:`contrastive_cross_entropy`: logits of one positive and K negatives, cross-entropy with the positive as
target. SwAV's pieces (:func:`sinkhorn`, :func:`swapped_prediction`) live here too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from contrastive import distributed as dist


def _at_least_float32(x: Tensor) -> Tensor:
    """Half-precision logits (AMP) go to float32 before the division by T and the softmax; float64 stays."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def contrastive_cross_entropy(pos_logits: Tensor, neg_logits: Tensor, temperature: float) -> Tensor:
    """Cross-entropy over ``[q.k+ | q.k-] / T`` with the positive (column 0) as target, mean over queries.

    pos_logits ``[N]`` and neg_logits ``[N, K]`` are cosine similarities; ``F.cross_entropy`` works on logits
    through log-sum-exp, so no raw ``exp`` can overflow at small temperatures.
    """
    logits = torch.cat([pos_logits.unsqueeze(1), neg_logits], dim=1)
    return in_batch_cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device), temperature)


def in_batch_cross_entropy(sim: Tensor, target: Tensor, temperature: float, exclude: Tensor | None = None) -> Tensor:
    """The same cross-entropy when the positive sits inside a similarity matrix ``[n, M]`` at column ``target``;
    columns ``exclude`` (a view compared with itself) are masked to -inf rather than cut out, so the shapes
    stay static and no boolean indexing syncs the device."""
    logits = _at_least_float32(sim) / temperature
    if exclude is not None:
        rows = torch.arange(len(logits), device=logits.device)
        logits = logits.index_put(
            (rows, exclude), torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device)
        )
    return F.cross_entropy(logits, target)


def info_nce(query: Tensor, positive: Tensor, negatives: Tensor | None = None, temperature: float = 0.1) -> Tensor:
    """InfoNCE (van den Oord et al. 2018; the loss of InstDisc, MoCo and SimCLR).

    Args:
        query: ``[N, D]``.
        positive: ``[N, D]``, one positive per query.
        negatives: ``[K, D]`` shared by all queries (a queue or a batch), ``[N, K, D]`` per query (a memory
            bank sample), or ``None``: the other positives of the batch serve as negatives.
        temperature: T in ``exp(q.k / T)``.

    Inputs are L2-normalised inside, so similarities are cosines.
    """
    query = F.normalize(query, dim=-1)
    positive = F.normalize(positive, dim=-1)
    if negatives is None:
        target = torch.arange(len(query), device=query.device)
        return in_batch_cross_entropy(query @ positive.T, target, temperature)
    pos = (query * positive).sum(-1)
    if negatives.dim() == 2:
        neg = query @ F.normalize(negatives, dim=-1).T
    elif negatives.dim() == 3:
        neg = torch.einsum("nd,nkd->nk", query, F.normalize(negatives, dim=-1))
    else:
        raise ValueError(f"negatives must be [K, D] or [N, K, D], got shape {tuple(negatives.shape)}")
    return contrastive_cross_entropy(pos, neg, temperature)


def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.5) -> Tensor:
    """NT-Xent, SimCLR's loss (Chen et al. 2020) over the 2N views of a batch.

    Each view's positive is the other view of its image; its negatives are the other 2N-2 views. Mean over the
    2N views. Single-process form of :func:`gathered_nt_xent`.
    """
    return gathered_nt_xent(z1, z2, z1, z2, offset=0, temperature=temperature)


def gathered_nt_xent(z1: Tensor, z2: Tensor, all_z1: Tensor, all_z2: Tensor, offset: int, temperature: float) -> Tensor:
    """NT-Xent of this process's queries against the views of the whole (gathered) batch.

    ``z1``, ``z2`` are the local ``[n, D]`` views, ``all_z1``, ``all_z2`` the ``[N, D]`` views of every
    process (gathered with gradient), and ``offset`` the position of the local samples inside them. With
    gradients that flow through the gather and DDP's gradient averaging, the result matches one process
    holding the whole batch.
    """
    n = len(z1)
    queries = F.normalize(torch.cat([z1, z2]), dim=-1)  # [2n, D]
    keys = F.normalize(torch.cat([all_z1, all_z2]), dim=-1)  # [2N, D]
    total = len(all_z1)
    local = torch.arange(n, device=z1.device) + offset
    self_idx = torch.cat([local, local + total])
    pos_idx = torch.cat([local + total, local])
    return in_batch_cross_entropy(queries @ keys.T, pos_idx, temperature, exclude=self_idx)


def gathered_info_nce(query: Tensor, all_keys: Tensor, offset: int, temperature: float) -> Tensor:
    """InfoNCE of local queries ``[n, D]`` against the keys of the whole gathered batch ``[N, D]``: the positive
    of query i is key ``offset + i``, the other N-1 keys are its negatives."""
    query, all_keys = F.normalize(query, dim=-1), F.normalize(all_keys, dim=-1)
    target = torch.arange(len(query), device=query.device) + offset
    return in_batch_cross_entropy(query @ all_keys.T, target, temperature)


def nce_loss(pos_logits: Tensor, neg_logits: Tensor, temperature: float, log_z: Tensor, num_data: int) -> Tensor:
    """NCE with a fixed normaliser, the original loss of InstDisc (Wu et al. 2018, eq. 5-7).

    ``P(i|v) = exp(v.f / T) / Z``; with K noise samples from the uniform distribution ``P_n = 1/n``, the data
    posterior is ``h = P / (P + K P_n)``. Returns ``-E[log h(pos)] - K E[log(1 - h(neg))]`` averaged per query,
    computed in log space.
    """
    k = neg_logits.shape[1]
    log_k_pn = math.log(k / num_data)

    def log_posterior(logits: Tensor) -> tuple[Tensor, Tensor]:
        log_p = _at_least_float32(logits) / temperature - log_z
        log_denominator = torch.logaddexp(log_p, torch.full_like(log_p, log_k_pn))
        return log_p - log_denominator, log_k_pn - log_denominator

    log_h_pos, _ = log_posterior(pos_logits)
    _, log_not_h_neg = log_posterior(neg_logits)
    return -(log_h_pos + log_not_h_neg.sum(1)).mean()


@torch.no_grad()
def sinkhorn(scores: Tensor, epsilon: float = 0.05, iterations: int = 3) -> Tensor:
    """Sinkhorn-Knopp codes of SwAV (Caron et al. 2020, Alg. 1): an equipartition of samples over prototypes.

    Args:
        scores: ``[B, K]`` sample-prototype similarities of this process's batch.
    Returns:
        codes ``[B, K]``, each row summing to 1, with every prototype receiving an equal share of the batch.
        Under ``torch.distributed`` the column sums are all-reduced, giving the codes of the global batch (equal
        batch sizes per process are required). The iterations run in log space in float64, so scores of +-1e4
        neither overflow nor leave a sample with an all-zero row.
    """
    log_q = scores.double() / epsilon
    log_batch = math.log(scores.shape[0] * dist.world_size())
    log_prototypes = math.log(scores.shape[1])
    for _ in range(iterations):
        log_q = log_q - dist.global_logsumexp(log_q, dim=0) - log_prototypes
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - log_batch
    return torch.exp(log_q + log_batch).to(scores.dtype)


def swapped_prediction(scores: list[Tensor], codes: list[Tensor], temperature: float = 0.1) -> Tensor:
    """SwAV's swapped prediction: the code of each large crop is predicted from every other crop.

    Args:
        scores: per crop ``[B, K]`` prototype scores (cosines), large crops first.
        codes: per large crop ``[B, K]`` Sinkhorn codes (targets, no gradient).
    Returns the cross-entropy averaged over all (code, other crop) pairs, as in the paper.
    """
    log_probs = [F.log_softmax(_at_least_float32(s) / temperature, dim=1) for s in scores]
    terms = []
    for i, q in enumerate(codes):
        for j, log_p in enumerate(log_probs):
            if j != i:
                terms.append(-(q.to(log_p.dtype) * log_p).sum(dim=1).mean())
    return torch.stack(terms).mean()
