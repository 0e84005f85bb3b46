"""The AdvBCT paper's P_up / P_comp / P_1, written out from the paper's definitions for the tests to compare the
reports against (an independent reference: nothing here comes from ``advbct``)."""

import math


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def reference_p_scores(old: list[float], independent: list[float], new: list[float], cross: list[float]) -> dict:
    """Per dataset: P_up = 100 s((M(n,n) - M(*,*)) / M(*,*)), P_comp = 100 s((M(n,o) - M(o,o)) / (M(*,*) - M(o,o))),
    P_1 their harmonic mean; each averaged over the datasets."""
    up = [100 * _sigmoid((n - i) / i) for i, n in zip(independent, new, strict=True)]
    comp = [100 * _sigmoid((c - o) / (i - o)) for o, i, c in zip(old, independent, cross, strict=True)]
    one = [2 * u * c / (u + c) for u, c in zip(up, comp, strict=True)]
    return {"p_up": sum(up) / len(up), "p_comp": sum(comp) / len(comp), "p_1": sum(one) / len(one)}
