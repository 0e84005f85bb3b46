"""Revisited Oxford / Paris scoring (Radenovic et al., CVPR 2018): mAP and mP@k under the Easy, Medium and Hard
protocols, for every query at once.

Each protocol splits a query's ground truth into "ok" images (positives) and "junk" images (ignored: removed from
the ranking before scoring). Removing junk is a shift of each positive's rank by the number of junk images above
it. The ground truth is one bit-flag matrix gathered into ranked order once; each protocol then counts junk above
every positive with binary searches, in work proportional to the listed images, for all queries at once instead
of a Python loop per query.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from advbct.evaluation.metrics import EmptyQueries, NothingToScore, average_over_queries, check_ranks

FLAGS = {"easy": 1, "hard": 2, "junk": 4}
PROTOCOLS: dict[str, tuple[int, int]] = {
    "easy": (FLAGS["easy"], FLAGS["junk"] | FLAGS["hard"]),
    "medium": (FLAGS["easy"] | FLAGS["hard"], FLAGS["junk"]),
    "hard": (FLAGS["hard"], FLAGS["junk"] | FLAGS["easy"]),
}


def _ground_truth_flags(gnd: Sequence[Mapping[str, Sequence[int]]], db_size: int) -> torch.Tensor:
    """(queries x database) uint8: bit 1 easy, bit 2 hard, bit 4 junk (a list may overlap another)."""
    flags = torch.zeros((len(gnd), db_size), dtype=torch.uint8)
    for key, bit in FLAGS.items():
        rows = [q for q, entry in enumerate(gnd) for _ in entry.get(key, ())]
        cols = [i for entry in gnd for i in entry.get(key, ())]
        if not cols:
            continue
        col_index = torch.as_tensor(cols, dtype=torch.long)
        if int(col_index.min()) < 0 or int(col_index.max()) >= db_size:
            raise ValueError(f"ground truth names database index {int(col_index.max())}, database has {db_size}")
        row_index = torch.as_tensor(rows, dtype=torch.long)
        flags[row_index, col_index] |= bit
    return flags


def _percent(values: torch.Tensor, scored: torch.Tensor, empty_queries: EmptyQueries) -> float:
    """The policy's average in percent; NaN where no query is left under this protocol, as revisitop's
    ``compute_map`` reports it, so the other protocols still report."""
    try:
        return 100.0 * average_over_queries(values, scored, empty_queries)
    except NothingToScore:
        return float("nan")


def protocol_scores(
    ranked_flags: torch.Tensor, ok_bits: int, junk_bits: int, kappas: Sequence[int], empty_queries: EmptyQueries
) -> dict:
    """mAP and mP@k (percent) from ground-truth flags in ranked order (queries x database).

    Only the ok and junk positions are looked at after one pass over the flags, so the work is proportional to
    the number of listed images, not to queries x database.
    """
    num_queries, depth = ranked_flags.shape
    rows, positions = torch.nonzero((ranked_flags & ok_bits) != 0, as_tuple=True)
    junk_rows, junk_positions = torch.nonzero((ranked_flags & junk_bits) != 0, as_tuple=True)
    # Junk above each positive: junk keys (row, position) are sorted row-major, so two binary searches count the
    # junk of the positive's row that comes before it.
    junk_keys = junk_rows * depth + junk_positions
    junk_above = torch.searchsorted(junk_keys, rows * depth + positions) - torch.searchsorted(junk_keys, rows * depth)
    counts = torch.bincount(rows, minlength=num_queries)
    first_of_row = torch.cumsum(counts, 0) - counts
    j = (torch.arange(rows.numel()) - first_of_row[rows]).double()
    r = (positions - junk_above).double()
    p0 = torch.where(r == 0, torch.ones_like(r), j / r.clamp(min=1))
    p1 = (j + 1) / (r + 1)
    scored = counts > 0
    ap = torch.zeros(num_queries, dtype=torch.float64).index_add_(0, rows, (p0 + p1) / 2)
    ap = ap / counts.clamp(min=1).double()
    result = {"map": _percent(ap, scored, empty_queries)}
    one_based = r + 1
    last_positive = torch.zeros(num_queries, dtype=torch.float64)
    last_positive[scored] = one_based[(first_of_row + counts - 1)[scored]]  # positives come in rank order
    for k in kappas:
        kq = last_positive.clamp(max=k)
        hits = torch.zeros(num_queries, dtype=torch.float64).index_add_(0, rows, (one_based <= kq[rows]).double())
        precision = hits / kq.clamp(min=1)
        result[f"mp@{k}"] = _percent(precision, scored, empty_queries)
    return result


def revisited_map(
    ranks: torch.Tensor,
    gnd: Sequence[Mapping[str, Sequence[int]]],
    kappas: Sequence[int] = (1, 5, 10),
    empty_queries: EmptyQueries = "skip",
) -> dict[str, dict[str, float]]:
    """Easy / Medium / Hard mAP and mP@k in percent.

    ``ranks``: (num_queries, db_size) 0-based database indices, best first. ``gnd``: one mapping per query with
    ``easy``, ``hard`` and ``junk`` index lists (``bbx`` is ignored here). Queries without any ok image under a
    protocol are handled as ``empty_queries`` says (by default left out of that protocol's averages).
    """
    ranks = check_ranks(ranks, len(gnd), gallery_size=torch.as_tensor(ranks).shape[-1]).cpu()
    ranked_flags = _ground_truth_flags(gnd, ranks.shape[1]).gather(1, ranks)
    return {
        name: protocol_scores(ranked_flags, ok, junk, kappas, empty_queries) for name, (ok, junk) in PROTOCOLS.items()
    }
