"""GLDv2 retrieval scoring: mAP@k as in the Google Landmarks v2 retrieval challenge.

A prediction that repeats an earlier prediction of the same query is skipped (it can never count twice) but still
takes its place in the ranking. Membership of every prediction in its query's solution list is found with one
``searchsorted`` over (query, index) keys, so a thousand queries with a hundred predictions each cost a few
tensor operations however large the index set is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from advbct.evaluation.metrics import EmptyQueries, average_over_queries, check_ranks


def _first_occurrences(rows: torch.Tensor) -> torch.Tensor:
    """True where a value appears in its row for the first time (left to right)."""
    sorted_values, order = torch.sort(rows, dim=1, stable=True)
    repeat = torch.zeros_like(rows, dtype=torch.bool)
    repeat[:, 1:] = sorted_values[:, 1:] == sorted_values[:, :-1]
    first = torch.ones_like(repeat)
    first.scatter_(1, order, ~repeat)
    return first


def gldv2_map(
    ranks: torch.Tensor, solution: Mapping[int, Sequence[int]], k: int = 100, empty_queries: EmptyQueries = "skip"
) -> float:
    """mAP@k in percent over the queries that ``solution`` lists.

    ``ranks``: (num_queries, n) 0-based index rows, best first (only the first ``k`` columns are read).
    ``solution``: query row -> the index rows showing its landmark; rows absent from it are not this solution's
    queries (the other usage's, or test photos of no landmark), and rows listed with an empty list are empty queries,
    handled as ``empty_queries`` says. AP_q = (1 / min(m_q, k)) * sum_{i <= k} P_q(i) rel_q(i), m_q = the number of
    relevant rows.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    ranks = check_ranks(ranks)
    listed = sorted(solution)
    if listed and (listed[0] < 0 or listed[-1] >= ranks.shape[0]):
        raise ValueError(f"solution names query row {listed[-1]}, ranks have {ranks.shape[0]} rows")
    has_relevant = torch.tensor([len(solution[q]) > 0 for q in listed], dtype=torch.bool)
    scored = [q for q in listed if len(solution[q]) > 0]
    ap = torch.zeros(len(listed), dtype=torch.float64)
    if scored:
        ap[has_relevant] = _average_precisions(ranks, solution, scored, k)
    return 100.0 * average_over_queries(ap, has_relevant, empty_queries)


def _average_precisions(
    ranks: torch.Tensor, solution: Mapping[int, Sequence[int]], scored: list[int], k: int
) -> torch.Tensor:
    """AP@k of each query row in ``scored`` (each with a non-empty solution list), in that order."""
    query_rows = torch.as_tensor(scored, dtype=torch.long)
    predictions = ranks.long().cpu()[query_rows, :k]
    relevant_sets = [torch.unique(torch.as_tensor(solution[q], dtype=torch.long)) for q in scored]
    counts = torch.as_tensor([len(s) for s in relevant_sets], dtype=torch.long)
    relevant = torch.cat(relevant_sets)
    width = int(max(int(relevant.max()), int(predictions.max()) if predictions.numel() else 0)) + 1
    owner = torch.repeat_interleave(torch.arange(len(scored)), counts)
    keys = owner * width + relevant
    sorted_keys, _ = torch.sort(keys)
    probe = torch.arange(len(scored)).unsqueeze(1) * width + predictions
    slot = torch.searchsorted(sorted_keys, probe).clamp(max=len(sorted_keys) - 1)
    hit = (sorted_keys[slot] == probe) & _first_occurrences(predictions)
    positions = torch.arange(1, predictions.shape[1] + 1, dtype=torch.float64)
    precision_at_hits = hit.cumsum(1).double() / positions * hit
    return precision_at_hits.sum(1) / counts.clamp(max=k).double()
