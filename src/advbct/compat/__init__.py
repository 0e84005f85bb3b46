"""Compatibility methods behind one interface, plus old-class statistics.

``list_methods()`` names the registered methods; ``create(name, context, **options)`` builds one. Register your
own with ``@register_method("name")`` on a ``CompatibilityMethod`` subclass; the training loop needs no change.
"""

from advbct.compat import advbct as _advbct  # noqa: F401  (registers advbct, its ablations, independent)
from advbct.compat import baselines as _baselines  # noqa: F401  (registers l2, bct, lce, unibct, hot-refresh)
from advbct.compat.base import (
    CompatBatch,
    CompatContext,
    CompatError,
    CompatibilityMethod,
    LossOutput,
    create,
    list_methods,
    method_class,
    register_method,
)
from advbct.compat.statistics import (
    ClassStatistics,
    RadiusSummary,
    StatisticsError,
    compute_class_statistics,
    load_statistics,
    radius_summary,
    save_statistics,
)

__all__ = [
    "ClassStatistics",
    "CompatBatch",
    "CompatContext",
    "CompatError",
    "CompatibilityMethod",
    "LossOutput",
    "RadiusSummary",
    "StatisticsError",
    "compute_class_statistics",
    "create",
    "list_methods",
    "load_statistics",
    "method_class",
    "radius_summary",
    "register_method",
    "save_statistics",
]
