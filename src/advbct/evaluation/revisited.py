"""Revisited Oxford / Paris scoring (Radenovic et al., CVPR 2018): mAP and mP@k under the Easy, Medium and Hard
protocols, for every query at once.

Each protocol splits a query's ground truth into "ok" images (positives) and "junk" images (ignored: removed from
the ranking before scoring). Removing junk is a shift of each positive's rank by the number of junk images above
it, which is a cumulative sum over the ranked junk mask; so the whole computation is a few (queries x database)
tensor operations instead of a Python loop per query.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

PROTOCOLS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}


def _membership(
    gnd: Sequence[Mapping[str, Sequence[int]]], keys: tuple[str, ...], shape: tuple[int, int]
) -> torch.Tensor:
    """(queries x database) boolean mask: True where the database image is in any of ``gnd[q][key]``."""
    rows, cols = [], []
    for q, entry in enumerate(gnd):
        for key in keys:
            indices = entry.get(key, ())
            rows.extend([q] * len(indices))
            cols.extend(indices)
    mask = torch.zeros(shape, dtype=torch.bool)
    if cols:
        col_index = torch.as_tensor(cols, dtype=torch.long)
        if int(col_index.min()) < 0 or int(col_index.max()) >= shape[1]:
            raise ValueError(f"ground truth names database index {int(col_index.max())}, database has {shape[1]}")
        mask[torch.as_tensor(rows, dtype=torch.long), col_index] = True
    return mask


def _check_ranks(ranks: torch.Tensor, num_queries: int) -> torch.Tensor:
    ranks = torch.as_tensor(ranks)
    if ranks.ndim != 2:
        raise ValueError(f"ranks must be (num_queries, db_size), got shape {tuple(ranks.shape)}")
    if ranks.shape[0] != num_queries:
        raise ValueError(f"ranks have {ranks.shape[0]} rows, the ground truth has {num_queries} queries")
    if ranks.dtype.is_floating_point or ranks.dtype == torch.bool:
        raise ValueError(f"ranks must hold integer database indices, got {ranks.dtype}")
    ranks = ranks.long().cpu()
    if ranks.numel() and (int(ranks.min()) < 0 or int(ranks.max()) >= ranks.shape[1]):
        raise ValueError(f"ranks hold indices outside [0, {ranks.shape[1]})")
    return ranks


def protocol_scores(
    ranks: torch.Tensor, ok: torch.Tensor, junk: torch.Tensor, kappas: Sequence[int]
) -> dict[str, float]:
    """mAP and mP@k (percent) of best-first ``ranks`` given (queries x database) ok and junk masks."""
    ok_ranked = ok.gather(1, ranks)
    junk_ranked = junk.gather(1, ranks)
    junk_above = junk_ranked.cumsum(1) - junk_ranked.long()
    adjusted_rank = torch.arange(ranks.shape[1]).unsqueeze(0) - junk_above
    positive_index = ok_ranked.cumsum(1) - 1
    num_ok = ok.sum(1)
    r = adjusted_rank.double()
    j = positive_index.double()
    p0 = torch.where(r == 0, torch.ones_like(r), j / r.clamp(min=1))
    p1 = (j + 1) / (r + 1)
    contrib = torch.where(ok_ranked, (p0 + p1) / 2, torch.zeros_like(r))
    scored = num_ok > 0
    ap = contrib.sum(1)[scored] / num_ok[scored].double()
    result = {"map": 100.0 * ap.mean().item() if scored.any() else float("nan")}
    one_based = torch.where(ok_ranked, adjusted_rank + 1, torch.zeros_like(adjusted_rank))
    last_positive = one_based.max(1).values
    for k in kappas:
        kq = last_positive.clamp(max=k)
        hits = (ok_ranked & (one_based <= kq.unsqueeze(1))).sum(1)
        precision = hits[scored].double() / kq[scored].clamp(min=1).double()
        result[f"mp@{k}"] = 100.0 * precision.mean().item() if scored.any() else float("nan")
    return result


def revisited_map(
    ranks: torch.Tensor, gnd: Sequence[Mapping[str, Sequence[int]]], kappas: Sequence[int] = (1, 5, 10)
) -> dict[str, dict[str, float]]:
    """Easy / Medium / Hard mAP and mP@k in percent.

    ``ranks``: (num_queries, db_size) 0-based database indices, best first. ``gnd``: one mapping per query with
    ``easy``, ``hard`` and ``junk`` index lists (``bbx`` is ignored here). Queries without any ok image under a
    protocol are left out of that protocol's averages.
    """
    ranks = _check_ranks(ranks, len(gnd))
    shape = (ranks.shape[0], ranks.shape[1])
    lists = {key: _membership(gnd, (key,), shape) for key in ("easy", "hard", "junk")}
    out: dict[str, dict[str, float]] = {}
    for name, (ok_keys, junk_keys) in PROTOCOLS.items():
        ok = torch.stack([lists[k] for k in ok_keys]).any(0)
        junk = torch.stack([lists[k] for k in junk_keys]).any(0)
        out[name] = protocol_scores(ranks, ok, junk, kappas)
    return out
