"""Evaluation metrics on precomputed features: weighted kNN, few-shot and linear probes, diagnostics."""

from contrastive.metrics.diagnostics import alignment, embedding_std, false_negative_rate, uniformity
from contrastive.metrics.knn import fewshot_indices, fewshot_knn_accuracy, knn_accuracy, knn_predict
from contrastive.metrics.linear import fewshot_linear_accuracy, linear_accuracy, train_linear_classifier

__all__ = [
    "alignment",
    "embedding_std",
    "false_negative_rate",
    "fewshot_indices",
    "fewshot_knn_accuracy",
    "fewshot_linear_accuracy",
    "knn_accuracy",
    "knn_predict",
    "linear_accuracy",
    "train_linear_classifier",
    "uniformity",
]
