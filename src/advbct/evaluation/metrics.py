"""Class-label retrieval metrics: mAP over the full ranking, mAP@R, top-k retrieval accuracy.

Queries are scored in chunks: one (chunk x gallery) similarity block is ranked at a time, so memory stays
bounded by ``chunk_size * gallery_size`` whatever the number of queries. A query with no relevant gallery item
is left out of every average, as in the standard protocols.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def average_precision_from_relevance(relevance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AP over the full ranking and AP@R, for rows of a best-first 0/1 relevance matrix (B, G).

    AP = sum_k P(k) rel(k) / n_rel; AP@R = sum_{k <= R} P(k) rel(k) / R with R = n_rel.
    Rows without any relevant item give 0 for both (callers leave them out).
    """
    # Hit counts are whole numbers, exact in float32 below 2**24 items (and its cumsum is several times faster
    # than int32's or float64's on CPUs); the per-row sums are taken in float64.
    count_dtype = torch.float32 if relevance.shape[1] < 2**24 else torch.float64
    hits = relevance.to(count_dtype).cumsum(1)
    n_rel = relevance.sum(1, dtype=torch.float64)
    ranks = torch.arange(1, relevance.shape[1] + 1, dtype=count_dtype, device=relevance.device)
    precision_hits = torch.where(relevance, hits / ranks, 0.0)
    ap = precision_hits.sum(1, dtype=torch.float64) / n_rel.clamp(min=1)
    within_r = ranks.unsqueeze(0) <= n_rel.unsqueeze(1)
    ap_at_r = torch.where(within_r, precision_hits, 0.0).sum(1, dtype=torch.float64) / n_rel.clamp(min=1)
    return ap, ap_at_r


def label_retrieval_metrics(
    query_emb: torch.Tensor,
    query_labels: torch.Tensor,
    gallery_emb: torch.Tensor,
    gallery_labels: torch.Tensor,
    exclude_same_index: bool = False,
    ks: tuple[int, ...] = (1, 5),
    chunk_size: int = 256,
) -> dict[str, float]:
    """mAP, mAP@R and top-k accuracy in percent, with cosine similarity on L2-normalised embeddings.

    ``exclude_same_index``: query i and gallery item i are the same image (a test set searched against
    itself, possibly embedded by two different models); that item is removed from query i's ranking.
    Equal similarities (duplicate images) rank in gallery order, so a score never depends on the device's sort.
    """
    if query_emb.shape[1] != gallery_emb.shape[1]:
        raise ValueError(f"query embeddings have dim {query_emb.shape[1]}, gallery embeddings {gallery_emb.shape[1]}")
    if exclude_same_index and query_emb.shape[0] != gallery_emb.shape[0]:
        raise ValueError("exclude_same_index needs queries and gallery to be the same images")
    q = F.normalize(query_emb.float(), dim=1)
    g = F.normalize(gallery_emb.float(), dim=1)
    gallery_labels = gallery_labels.to(g.device)
    query_labels = query_labels.to(q.device)
    sums = {"map": 0.0, "map_at_r": 0.0, **{f"top{k}": 0.0 for k in ks}}
    scored = 0
    for start in range(0, q.shape[0], chunk_size):
        block = q[start : start + chunk_size]
        sims = block @ g.T
        rows = torch.arange(block.shape[0], device=sims.device)
        if exclude_same_index:
            sims[rows, rows + start] = float("-inf")
        order = torch.argsort(sims, dim=1, descending=True, stable=True)
        if exclude_same_index:
            order = order[:, :-1]
        relevance = gallery_labels[order] == query_labels[start : start + chunk_size].unsqueeze(1)
        has_relevant = relevance.any(1)
        ap, ap_at_r = average_precision_from_relevance(relevance)
        sums["map"] += ap[has_relevant].sum().item()
        sums["map_at_r"] += ap_at_r[has_relevant].sum().item()
        for k in ks:
            sums[f"top{k}"] += relevance[:, :k].any(1)[has_relevant].sum().item()
        scored += int(has_relevant.sum())
    if scored == 0:
        raise ValueError("no query has a relevant gallery item; nothing to score")
    return {name: 100.0 * value / scored for name, value in sums.items()}
