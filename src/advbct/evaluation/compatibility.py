"""The AdvBCT paper's compatibility summary scores (the criterion is ``results.compatibility_criterion``)."""

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
    old: Sequence[float],
    independent: Sequence[float],
    self_test: Sequence[float],
    cross_test: Sequence[float],
) -> dict[str, float]:
    """P_up, P_comp and P_1 (percent) from one mAP (percent) per dataset in each argument.

    old = M(o,o), independent = M(*,*), self_test = M(n,n), cross_test = M(n,o); datasets weigh equally.
    Per dataset d: P_up_d = 100 sigmoid((M(n,n) - M(*,*)) / M(*,*)),
    P_comp_d = 100 sigmoid((M(n,o) - M(o,o)) / (M(*,*) - M(o,o))), P_1_d = their harmonic mean; each score is
    then averaged over datasets. This order (sigmoid and harmonic mean per dataset, then the mean) is the one
    that reproduces the AdvBCT paper's table to its last digit; the sigmoid of the mean does not. With one
    dataset the two orders agree.
    """
    n = len(old)
    if n == 0:
        raise ValueError("compatibility_scores needs at least one dataset")
    old_v = _check("old", old, n)
    ind_v = _check("independent", independent, n)
    self_v = _check("self_test", self_test, n)
    cross_v = _check("cross_test", cross_test, n)
    p_up, p_comp, p_1 = [], [], []
    for i, (o, ind, s, c) in enumerate(zip(old_v, ind_v, self_v, cross_v, strict=True)):
        if ind <= 0:
            raise ValueError(f"dataset {i}: independent mAP must be positive, got {ind}")
        if ind == o:
            raise ValueError(f"dataset {i}: independent and old mAP are equal ({o}); P_comp is undefined")
        up, comp = 100.0 * _sigmoid((s - ind) / ind), 100.0 * _sigmoid((c - o) / (ind - o))
        p_up.append(up)
        p_comp.append(comp)
        p_1.append(2.0 * up * comp / (up + comp))
    return {"p_up": sum(p_up) / n, "p_comp": sum(p_comp) / n, "p_1": sum(p_1) / n}
