"""Metrics of slide-level classification: AUC, balanced accuracy and macro-F1 (survival's c-index is in
`ssmkit.medical.survival`)."""
from __future__ import annotations

import math
import warnings

import numpy as np

__all__ = ["classification_metrics"]


def classification_metrics(prob: np.ndarray, label: np.ndarray) -> dict[str, float]:
    """AUC (binary, or macro one-vs-rest over the classes present; NaN with one class), balanced accuracy
    and macro F1 of the argmax."""
    from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

    pred = prob.argmax(1)
    present = np.unique(label)
    if present.size < 2:
        auc = math.nan
    else:  # AUC over the classes present, their probabilities renormalised
        cols = prob[:, present] / prob[:, present].sum(1, keepdims=True)
        auc = (roc_auc_score(label == present[1], cols[:, 1]) if present.size == 2
               else roc_auc_score(label, cols, multi_class="ovr", labels=present))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bacc = balanced_accuracy_score(label, pred)
    f1 = f1_score(label, pred, average="macro", labels=np.arange(prob.shape[1]), zero_division=0)
    return {"auc": float(auc), "balanced_acc": float(bacc), "f1": float(f1)}
