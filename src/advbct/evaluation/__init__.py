"""Pure retrieval metrics, the self/cross protocol, and the compatibility summary scores."""

from advbct.evaluation.compatibility import compatibility_scores, empirical_criterion
from advbct.evaluation.metrics import average_precision_from_relevance, label_retrieval_metrics
from advbct.evaluation.protocol import embed_images, evaluate_pairs, upgrade_report

__all__ = [
    "average_precision_from_relevance",
    "compatibility_scores",
    "embed_images",
    "empirical_criterion",
    "evaluate_pairs",
    "label_retrieval_metrics",
    "upgrade_report",
]
