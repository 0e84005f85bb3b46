"""Class-label retrieval metrics: mAP over the full ranking, mAP@R, top-k retrieval accuracy.

Queries are scored in chunks: one (chunk x gallery) similarity block at a time, so memory stays bounded by
``chunk_size * gallery_size`` whatever the number of queries. A query with no relevant gallery item is left out of
every average, as in the standard protocols.

Every one of these metrics depends only on where the relevant items land in the ranking, and the k-th relevant
item (best first) lands at k + (the number of irrelevant items scored above it). So no index-carrying argsort of
the gallery is needed: the irrelevant scores are sorted as plain values and each relevant score is placed among
them by binary search. An irrelevant item that exactly ties a relevant one is ordered by gallery position in a
full stable sort; the rare row holding such a tie is ranked by that sort instead, so the results are the same
either way.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F


def label_retrieval_metrics(
    query_emb: torch.Tensor,
    query_labels: torch.Tensor,
    gallery_emb: torch.Tensor,
    gallery_labels: torch.Tensor,
    exclude_same_index: bool = False,
    ks: tuple[int, ...] = (1, 5),
    chunk_size: int = 256,
    own_gallery_index: torch.Tensor | None = None,
) -> dict[str, float]:
    """mAP, mAP@R and top-k accuracy in percent, with cosine similarity on L2-normalised embeddings.

    ``exclude_same_index``: query i and gallery item i are the same image (a test set searched against
    itself, possibly embedded by two different models); that item is removed from query i's ranking.
    ``own_gallery_index`` says the same for queries that are some of the gallery's images: query i is gallery
    item ``own_gallery_index[i]``, which is removed from its ranking (a probe of a gallery's own images).
    Equal similarities (duplicate images) rank in gallery order, so a score never depends on the device's sort.
    """
    sums = {"map": 0.0, "map_at_r": 0.0, **{f"top{k}": 0.0 for k in ks}}
    scored = 0
    chunks = ranked_chunks(
        query_emb, query_labels, gallery_emb, gallery_labels, exclude_same_index, chunk_size, own_gallery_index
    )
    for positions, n_rel in chunks:
        has_relevant = n_rel > 0
        ap, ap_at_r = average_precision_from_positions(positions, n_rel)
        sums["map"] += ap[has_relevant].sum().item()
        sums["map_at_r"] += ap_at_r[has_relevant].sum().item()
        for k in ks:
            sums[f"top{k}"] += (positions[:, 0] <= k)[has_relevant].sum().item()
        scored += int(has_relevant.sum())
    if scored == 0:
        raise ValueError("no query has a relevant gallery item; nothing to score")
    return {name: 100.0 * value / scored for name, value in sums.items()}


def query_average_precision(
    query_emb: torch.Tensor,
    query_labels: torch.Tensor,
    gallery_emb: torch.Tensor,
    gallery_labels: torch.Tensor,
    exclude_same_index: bool = False,
    chunk_size: int = 256,
) -> torch.Tensor:
    """Each query's AP (a fraction, float64 on the CPU; NaN for a query with no relevant gallery item): the
    per-query values whose mean over the non-NaN entries is :func:`label_retrieval_metrics`' mAP / 100, for
    statistics over queries such as a bootstrap interval."""
    chunks = ranked_chunks(query_emb, query_labels, gallery_emb, gallery_labels, exclude_same_index, chunk_size)
    aps = [
        torch.where(n_rel > 0, average_precision_from_positions(positions, n_rel)[0], float("nan")).cpu()
        for positions, n_rel in chunks
    ]
    return torch.cat(aps) if aps else torch.zeros(0, dtype=torch.float64)


def ranked_chunks(
    query_emb: torch.Tensor,
    query_labels: torch.Tensor,
    gallery_emb: torch.Tensor,
    gallery_labels: torch.Tensor,
    exclude_same_index: bool = False,
    chunk_size: int = 256,
    own_gallery_index: torch.Tensor | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The queries ranked ``chunk_size`` at a time: per chunk, the relevant items' positions (see
    :func:`relevant_positions`) and each query's number of relevant items. Arguments as for
    :func:`label_retrieval_metrics`; mismatched shapes and non-finite embeddings are refused before any ranking."""
    if query_emb.shape[1] != gallery_emb.shape[1]:
        raise ValueError(f"query embeddings have dim {query_emb.shape[1]}, gallery embeddings {gallery_emb.shape[1]}")
    if exclude_same_index and query_emb.shape[0] != gallery_emb.shape[0]:
        raise ValueError("exclude_same_index needs queries and gallery to be the same images")
    if exclude_same_index:
        own_gallery_index = torch.arange(query_emb.shape[0])
    if own_gallery_index is not None and own_gallery_index.shape != (query_emb.shape[0],):
        raise ValueError(f"own_gallery_index needs one entry per query, got {tuple(own_gallery_index.shape)}")
    for side, emb in (("query", query_emb), ("gallery", gallery_emb)):
        if not bool(torch.isfinite(emb).all()):
            raise ValueError(f"{side} embeddings contain NaN or inf (a diverged model?); nothing can be ranked")
    q = F.normalize(query_emb.float(), dim=1)
    g = F.normalize(gallery_emb.float(), dim=1)
    gallery_labels = gallery_labels.to(g.device)
    query_labels = query_labels.to(q.device)
    for start in range(0, q.shape[0], chunk_size):
        block = q[start : start + chunk_size]
        sims = block @ g.T
        relevant = gallery_labels.unsqueeze(0) == query_labels[start : start + chunk_size].unsqueeze(1)
        counted = torch.ones_like(relevant)
        if own_gallery_index is not None:
            rows = torch.arange(block.shape[0], device=sims.device)
            own = own_gallery_index[start : start + chunk_size].to(sims.device)
            relevant[rows, own] = False
            counted[rows, own] = False
        yield relevant_positions(sims, relevant, counted), relevant.sum(1)


def relevant_positions(sims: torch.Tensor, relevant: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """1-based ranking positions (B, K) of each row's relevant items, best first, padded with ``inf`` beyond the
    row's number of relevant items (K is the largest).

    ``counted`` marks the items that take part in the ranking at all (False: the query's own image, which must not
    be marked relevant either). Relevant items tied with each other may come in either order: the positions they
    fill are the same. A row where an irrelevant item exactly ties a relevant one (a few rows in ten thousand for
    CIFAR-100) is ranked again by a full stable sort, which puts the earlier gallery item first.
    """
    b, g = sims.shape
    n_rel = relevant.sum(1, keepdim=True)
    k_max = max(1, int(n_rel.max()) if b else 0)
    irrelevant = counted & ~relevant
    # Each row's irrelevant scores in ascending order (the rest as -inf, below every real score), and its
    # relevant scores best first (padded with -inf). A binary search per relevant score then counts the
    # irrelevant items above it.
    irrelevant_sorted = _sort_rows(torch.where(irrelevant, sims, float("-inf")))
    best_first = torch.topk(torch.where(relevant, sims, float("-inf")), k_max, dim=1).values.contiguous()
    at_most = torch.searchsorted(irrelevant_sorted, best_first, right=True)
    k = torch.arange(1, k_max + 1, device=sims.device)
    real = k.unsqueeze(0) <= n_rel
    positions = torch.where(real, (k + g - at_most).to(torch.float64), float("inf"))
    tied = (real & (torch.searchsorted(irrelevant_sorted, best_first) != at_most)).any(1)
    if bool(tied.any()):
        rows = tied.nonzero().squeeze(1)
        exact = relevant_positions_by_sort(sims[rows], relevant[rows], counted[rows])
        positions[rows] = F.pad(exact, (0, k_max - exact.shape[1]), value=float("inf"))
    return positions


def _sort_rows(x: torch.Tensor) -> torch.Tensor:
    """Each row sorted ascending. On the CPU numpy's vectorised sort is several times faster than torch's."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.sort(x.numpy(), axis=1))
    return torch.sort(x, dim=1).values


def relevant_positions_by_sort(sims: torch.Tensor, relevant: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """``relevant_positions`` by a full stable sort: exact ties rank in gallery order. For the rows with ties."""
    sims = torch.where(counted, sims, float("-inf"))
    order = torch.argsort(sims, dim=1, descending=True, stable=True)
    ranked = torch.gather(relevant, 1, order)
    k_max = max(1, int(relevant.sum(1).max()))
    place = torch.arange(1, sims.shape[1] + 1, dtype=torch.float64, device=sims.device).expand_as(sims)
    # The relevant items' places, best first, then inf: sorting with the irrelevant places set to inf.
    places = torch.where(ranked, place, float("inf"))
    return torch.sort(places, dim=1).values[:, :k_max]


def average_precision_from_positions(positions: torch.Tensor, n_rel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AP and AP@R from the 1-based positions (B, K) of each row's relevant items, best first (``inf`` padding).

    The k-th relevant item at position p contributes the precision k / p; AP averages over all n_rel of them,
    AP@R over those within the first R = n_rel places (divided by R all the same). Rows with n_rel = 0 give 0.
    """
    k = torch.arange(1, positions.shape[1] + 1, dtype=torch.float64, device=positions.device)
    precision = k / positions.to(torch.float64)  # inf padding gives 0
    denominator = n_rel.to(torch.float64).clamp(min=1)
    ap = precision.sum(1) / denominator
    within_r = positions <= n_rel.unsqueeze(1)
    ap_at_r = torch.where(within_r, precision, 0.0).sum(1) / denominator
    return ap, ap_at_r


def metrics_from_rankings(ranked: torch.Tensor, own: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """mAP and top-1 (percent) of rankings that a search engine returned, for queries that are gallery items.

    ``ranked`` (Q, K): gallery positions best first, for instance the ids of a vector database's hits; ``own``
    (Q,): each query's own position, left out of its ranking wherever it appears; ``labels``: every gallery
    item's class. A relevant item beyond the K returned counts as never found, so with K the gallery size these
    are exactly :func:`label_retrieval_metrics`' mAP and top-1.
    """
    if ranked.ndim != 2 or own.shape != (ranked.shape[0],):
        raise ValueError(f"rankings {tuple(ranked.shape)} and own positions {tuple(own.shape)} do not match")
    kept = ranked != own.unsqueeze(1)
    relevant = (labels[ranked] == labels[own].unsqueeze(1)) & kept
    place = torch.cumsum(kept, 1).to(torch.float64)
    positions = torch.sort(torch.where(relevant, place, float("inf")), dim=1).values
    n_relevant = torch.bincount(labels, minlength=int(labels.max()) + 1)[labels[own]] - 1
    scored = n_relevant > 0
    if not bool(scored.any()):
        raise ValueError("no query has a relevant gallery item; nothing to score")
    ap, _ = average_precision_from_positions(positions, n_relevant)
    first_kept = kept.to(torch.int8).argmax(1)
    top1 = relevant[torch.arange(ranked.shape[0]), first_kept]
    return {"map": 100.0 * float(ap[scored].mean()), "top1": 100.0 * float(top1[scored].float().mean())}
