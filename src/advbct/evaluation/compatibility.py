"""The AdvBCT paper's compatibility summary scores and the empirical compatibility criterion."""

from __future__ import annotations

import math
from collections.abc import Sequence


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _check(name: str, values: Sequence[float], length: int) -> list[float]:
    values = [float(v) for v in values]
    if len(values) != length:
        raise ValueError(f"{name} has {len(values)} values, expected one per dataset ({length})")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name} holds a non-finite value: {values}")
    return values


def compatibility_scores(
    old: Sequence[float], independent: Sequence[float], self_test: Sequence[float], cross_test: Sequence[float]
) -> dict[str, float]:
    """P_up, P_comp and P_1 (percent) from one mAP (percent) per dataset in each argument.

    old = M(o,o), independent = M(*,*), self_test = M(n,n), cross_test = M(n,o); datasets weigh equally.
    """
    n = len(old)
    if n == 0:
        raise ValueError("compatibility_scores needs at least one dataset")
    old_v = _check("old", old, n)
    ind_v = _check("independent", independent, n)
    self_v = _check("self_test", self_test, n)
    cross_v = _check("cross_test", cross_test, n)
    for i, (o, ind) in enumerate(zip(old_v, ind_v, strict=True)):
        if ind <= 0:
            raise ValueError(f"dataset {i}: independent mAP must be positive, got {ind}")
        if ind == o:
            raise ValueError(f"dataset {i}: independent and old mAP are equal ({o}); P_comp is undefined")
    up = sum((s - ind) / ind for s, ind in zip(self_v, ind_v, strict=True)) / n
    comp = sum((c - o) / (ind - o) for c, o, ind in zip(cross_v, old_v, ind_v, strict=True)) / n
    p_up, p_comp = 100.0 * _sigmoid(up), 100.0 * _sigmoid(comp)
    return {"p_up": p_up, "p_comp": p_comp, "p_1": 2.0 * p_up * p_comp / (p_up + p_comp)}


def empirical_criterion(cross_test: float, old_test: float) -> bool:
    """M(n,o) > M(o,o): the new model's queries find the old gallery better than the old model does."""
    return cross_test > old_test
