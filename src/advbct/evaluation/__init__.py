"""Pure retrieval metrics, the self/cross protocol, typed results and the compatibility summary scores."""

from advbct.evaluation.compatibility import compatibility_scores
from advbct.evaluation.gldv2 import gldv2_map
from advbct.evaluation.metrics import average_precision_from_positions, label_retrieval_metrics
from advbct.evaluation.protocol import embed_images, evaluate_pairs
from advbct.evaluation.results import Criterion, TestResult, UpgradeReport, compatibility_criterion
from advbct.evaluation.revisited import revisited_map
from advbct.evaluation.search import exact_search

__all__ = [
    "Criterion",
    "TestResult",
    "UpgradeReport",
    "average_precision_from_positions",
    "compatibility_criterion",
    "compatibility_scores",
    "embed_images",
    "evaluate_pairs",
    "exact_search",
    "gldv2_map",
    "label_retrieval_metrics",
    "revisited_map",
]
