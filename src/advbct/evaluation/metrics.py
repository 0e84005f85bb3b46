"""Class-label retrieval metrics: mAP over the full ranking, mAP@R, top-k retrieval accuracy; and the two
conventions every metric of ``advbct.evaluation`` shares.

Input: a ranking is ``ranks`` (queries, depth), 0-based integer gallery indices, best first, checked by
:func:`check_ranks` (the label metrics here take embeddings instead and rank them themselves). Output: percent.

Empty queries (no relevant gallery item): every metric takes ``empty_queries`` (see :data:`EMPTY_QUERY_ACTIONS`),
by default ``"skip"``, which leaves them out of every average, as the standard protocols do; an average over no
query at all raises :class:`NothingToScore`.

Queries are scored in chunks: one (chunk x gallery) similarity block at a time, so memory stays bounded by
``chunk_size * gallery_size`` whatever the number of queries.

Every one of these metrics depends only on where the relevant items land in the ranking, and the k-th relevant
item (best first) lands at k + (the number of irrelevant items scored above it). So no index-carrying argsort of
the gallery is needed: the irrelevant scores are sorted as plain values and each relevant score is placed among
them by binary search. An irrelevant item that exactly ties a relevant one is ordered by gallery position in a
full stable sort; the rare row holding such a tie is ranked by that sort instead, so the results are the same
either way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F

SimilarityBlock = Callable[[int, int], torch.Tensor]
# What a metric does with a query that has no relevant gallery item (as torchmetrics' ``empty_target_action``):
# "skip" leaves it out of the average, "zero" counts it as scoring 0, "error" refuses the whole evaluation.
EmptyQueries = Literal["skip", "zero", "error"]
EMPTY_QUERY_ACTIONS: tuple[str, ...] = get_args(EmptyQueries)


class NothingToScore(ValueError):
    """No query is left to average over: none has a relevant gallery item."""


def average_over_queries(values: torch.Tensor, has_relevant: torch.Tensor, empty_queries: EmptyQueries) -> float:
    """The mean of per-query ``values`` under the empty-query policy; ``has_relevant`` (bool, one per query) says
    which queries have a relevant item. The values of the others must be 0 (what "zero" counts them as). The mean
    is taken in the dtype of ``values``."""
    if empty_queries not in EMPTY_QUERY_ACTIONS:
        raise ValueError(f"empty_queries must be one of {', '.join(EMPTY_QUERY_ACTIONS)}, got {empty_queries!r}")
    empty = int((~has_relevant).sum())
    if empty_queries == "error" and empty:
        raise ValueError(f"{empty} of {has_relevant.numel()} queries have no relevant gallery item")
    kept = values if empty_queries == "zero" else values[has_relevant]
    if kept.numel() == 0:
        raise NothingToScore("no query has a relevant gallery item; nothing to score")
    return float(kept.mean())


def check_ranks(ranks: torch.Tensor, num_queries: int | None = None, gallery_size: int | None = None) -> torch.Tensor:
    """``ranks`` as int64 after checking the ranking convention: (queries, depth) integer gallery indices, with
    ``num_queries`` rows and indices below ``gallery_size`` where those are given."""
    ranks = torch.as_tensor(ranks)
    if ranks.ndim != 2:
        raise ValueError(f"ranks must be (queries, depth) gallery indices, got shape {tuple(ranks.shape)}")
    if ranks.dtype.is_floating_point or ranks.dtype == torch.bool:
        raise ValueError(f"ranks must hold integer gallery indices, got {ranks.dtype}")
    if num_queries is not None and ranks.shape[0] != num_queries:
        raise ValueError(f"ranks have {ranks.shape[0]} rows, the ground truth has {num_queries} queries")
    ranks = ranks.long()
    if gallery_size is not None and ranks.numel() and (int(ranks.min()) < 0 or int(ranks.max()) >= gallery_size):
        raise ValueError(f"ranks hold indices outside [0, {gallery_size})")
    return ranks


@dataclass(frozen=True)
class QueryScores:
    """Each query's scores (the functional form, as torchmetrics keeps one): AP and AP@R in [0, 1], whether the
    k-th best item was relevant for each k, and whether the query had any relevant item at all (those without
    are left out of every average, as in the standard protocols). Per-query values are what paired comparisons
    need: negative flips, bootstrap intervals."""

    ap: torch.Tensor
    ap_at_r: torch.Tensor
    hits: dict[int, torch.Tensor]
    scored: torch.Tensor

    def means(self, empty_queries: EmptyQueries = "skip") -> dict[str, float]:
        """mAP, mAP@R and top-k accuracy in percent over the queries, empty ones as ``empty_queries`` says."""
        kept = {"map": self.ap, "map_at_r": self.ap_at_r, **{f"top{k}": hit for k, hit in self.hits.items()}}
        return {name: 100.0 * average_over_queries(v.double(), self.scored, empty_queries) for name, v in kept.items()}


def label_retrieval_metrics(
    query_emb: torch.Tensor,
    query_labels: torch.Tensor,
    gallery_emb: torch.Tensor,
    gallery_labels: torch.Tensor,
    exclude_same_index: bool = False,
    ks: tuple[int, ...] = (1, 5),
    chunk_size: int = 256,
    own_gallery_index: torch.Tensor | None = None,
    empty_queries: EmptyQueries = "skip",
) -> dict[str, float]:
    """mAP, mAP@R and top-k accuracy in percent, with cosine similarity on L2-normalised embeddings.

    ``exclude_same_index``: query i and gallery item i are the same image (a test set searched against
    itself, possibly embedded by two different models); that item is removed from query i's ranking.
    ``own_gallery_index`` says the same for queries that are some of the gallery's images: query i is gallery
    item ``own_gallery_index[i]``, which is removed from its ranking (a probe of a gallery's own images).
    Equal similarities (duplicate images) rank in gallery order, so a score never depends on the device's sort.
    """
    return label_retrieval_scores(
        query_emb, query_labels, gallery_emb, gallery_labels, exclude_same_index, ks, chunk_size, own_gallery_index
    ).means(empty_queries)


def label_retrieval_scores(
    query_emb: torch.Tensor,
    query_labels: torch.Tensor,
    gallery_emb: torch.Tensor,
    gallery_labels: torch.Tensor,
    exclude_same_index: bool = False,
    ks: tuple[int, ...] = (1, 5),
    chunk_size: int = 256,
    own_gallery_index: torch.Tensor | None = None,
) -> QueryScores:
    """:func:`label_retrieval_metrics` query by query."""
    if query_emb.shape[1] != gallery_emb.shape[1]:
        raise ValueError(f"query embeddings have dim {query_emb.shape[1]}, gallery embeddings {gallery_emb.shape[1]}")
    if exclude_same_index and query_emb.shape[0] != gallery_emb.shape[0]:
        raise ValueError("exclude_same_index needs queries and gallery to be the same images")
    if exclude_same_index:
        own_gallery_index = torch.arange(query_emb.shape[0])
    check_finite(query=query_emb, gallery=gallery_emb)
    q = F.normalize(query_emb.float(), dim=1)
    g = F.normalize(gallery_emb.float(), dim=1)
    return scores_from_similarity(
        lambda start, end: q[start:end] @ g.T, query_labels, gallery_labels, ks, chunk_size, own_gallery_index
    )


def check_finite(**embeddings: torch.Tensor) -> None:
    """Refuse NaN or inf before ranking: a diverged model would otherwise score as a plausible number."""
    for side, emb in embeddings.items():
        if not bool(torch.isfinite(emb).all()):
            raise ValueError(f"{side} embeddings contain NaN or inf (a diverged model?); nothing can be ranked")


def scores_from_similarity(
    similarity: SimilarityBlock,
    query_labels: torch.Tensor,
    gallery_labels: torch.Tensor,
    ks: tuple[int, ...] = (1, 5),
    chunk_size: int = 256,
    own_gallery_index: torch.Tensor | None = None,
) -> QueryScores:
    """Per-query scores of any ranking given as a similarity (higher first): ``similarity(start, end)`` returns
    the (end - start, gallery) block of queries ``start:end``. Cosine on one gallery, or scores merged across
    the generations of a mixed gallery, are both just a block function."""
    num_queries = query_labels.shape[0]
    if own_gallery_index is not None and own_gallery_index.shape != (num_queries,):
        raise ValueError(f"own_gallery_index needs one entry per query, got {tuple(own_gallery_index.shape)}")
    parts: list[tuple[torch.Tensor, ...]] = []
    for start in range(0, num_queries, chunk_size):
        sims = similarity(start, min(start + chunk_size, num_queries))
        labels = gallery_labels.to(sims.device)
        relevant = labels.unsqueeze(0) == query_labels[start : start + chunk_size].to(sims.device).unsqueeze(1)
        counted = torch.ones_like(relevant)
        if own_gallery_index is not None:
            rows = torch.arange(sims.shape[0], device=sims.device)
            own = own_gallery_index[start : start + chunk_size].to(sims.device)
            relevant[rows, own] = False
            counted[rows, own] = False
        positions = relevant_positions(sims, relevant, counted)
        n_rel = relevant.sum(1)
        ap, ap_at_r = average_precision_from_positions(positions, n_rel)
        parts.append((ap.cpu(), ap_at_r.cpu(), (n_rel > 0).cpu(), *(positions[:, 0].cpu() <= k for k in ks)))
    columns = [torch.cat(column) for column in zip(*parts, strict=True)]
    return QueryScores(columns[0], columns[1], dict(zip(ks, columns[3:], strict=True)), columns[2])


def relevant_positions(sims: torch.Tensor, relevant: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """1-based ranking positions (B, K) of each row's relevant items, best first, padded with ``inf`` beyond the
    row's number of relevant items (K is the largest).

    ``counted`` marks the items that take part in the ranking at all (False: the query's own image, which must not
    be marked relevant either). Relevant items tied with each other may come in either order: the positions they
    fill are the same. A row where an irrelevant item exactly ties a relevant one (rare, as with duplicate images)
    is ranked again by a full stable sort, which puts the earlier gallery item first.
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


def metrics_from_rankings(
    ranks: torch.Tensor, own: torch.Tensor, labels: torch.Tensor, empty_queries: EmptyQueries = "skip"
) -> dict[str, float]:
    """mAP and top-1 (percent) of rankings that a search engine returned, for queries that are gallery items.

    ``ranks`` (Q, K): gallery positions best first, for instance the ids of a vector database's hits; ``own``
    (Q,): each query's own position, left out of its ranking wherever it appears; ``labels``: every gallery
    item's class. A relevant item beyond the K returned counts as never found, so with K the gallery size these
    are exactly :func:`label_retrieval_metrics`' mAP and top-1.
    """
    ranks = check_ranks(ranks, gallery_size=labels.shape[0])
    if own.shape != (ranks.shape[0],):
        raise ValueError(f"rankings {tuple(ranks.shape)} and own positions {tuple(own.shape)} do not match")
    kept = ranks != own.unsqueeze(1)
    relevant = (labels[ranks] == labels[own].unsqueeze(1)) & kept
    place = torch.cumsum(kept, 1).to(torch.float64)
    positions = torch.sort(torch.where(relevant, place, float("inf")), dim=1).values
    n_relevant = torch.bincount(labels, minlength=int(labels.max()) + 1)[labels[own]] - 1
    scored = n_relevant > 0
    ap, _ = average_precision_from_positions(positions, n_relevant)
    first_kept = kept.to(torch.int8).argmax(1)
    top1 = relevant[torch.arange(ranks.shape[0]), first_kept]
    return {
        "map": 100.0 * average_over_queries(ap, scored, empty_queries),
        "top1": 100.0 * average_over_queries(top1.float(), scored, empty_queries),
    }
