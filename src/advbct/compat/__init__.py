"""Compatibility methods behind one interface, plus old-class statistics.

``list_methods()`` names the registered methods, ``methods_of_kind(...)`` those of some kinds and ``method_info``
tells one's kind and needs; ``create(name, context, **options)`` builds one. Register your own with
``@register_method("name", kind=...)`` on a ``CompatibilityMethod`` subclass with an ``Options`` schema; the
training loop needs no change.
"""

from advbct.compat import advbct as _advbct  # noqa: F401  (registers advbct, its ablations, independent)
from advbct.compat import baselines as _baselines  # noqa: F401  (registers l2, bct, lce, unibct, hot-refresh)
from advbct.compat.base import (
    CompatBatch,
    CompatContext,
    CompatError,
    CompatibilityMethod,
    LossOutput,
    MethodInfo,
    MethodKind,
    NoOptions,
    check_options,
    compared_methods,
    create,
    list_methods,
    method_class,
    method_info,
    methods_of_kind,
    options_schema,
    reference_method,
    register_method,
    resolved_options,
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
    "MethodInfo",
    "MethodKind",
    "NoOptions",
    "RadiusSummary",
    "StatisticsError",
    "check_options",
    "compared_methods",
    "compute_class_statistics",
    "create",
    "list_methods",
    "load_statistics",
    "method_class",
    "method_info",
    "methods_of_kind",
    "options_schema",
    "radius_summary",
    "reference_method",
    "register_method",
    "resolved_options",
    "save_statistics",
]
