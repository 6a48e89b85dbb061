"""Metrics of DNA models: sequence classification (accuracy, MCC, macro-F1) and the base-composition
baseline of language-model perplexity."""
from __future__ import annotations

import math

import numpy as np
import torch

from ssmkit.genomics.tokenizer import BASE_IDS, VOCAB_SIZE

__all__ = ["classification_metrics", "composition_perplexity"]


def classification_metrics(pred: np.ndarray, label: np.ndarray) -> dict[str, float]:
    """Accuracy, Matthews correlation and macro-F1 of predicted class indices against the labels."""
    from sklearn.metrics import f1_score, matthews_corrcoef

    return {"accuracy": float((label == pred).mean()), "mcc": float(matthews_corrcoef(label, pred)),
            "f1": float(f1_score(label, pred, average="macro"))}


def composition_perplexity(train, eval_set) -> float:
    """Per-base perplexity on the windows of `eval_set` (the targets the LM's eval scores) of a predictor that
    knows only the base frequencies of the training regions of `train` (a `RandomWindows`): what pretraining
    must beat to have learned more than composition (4 is the uniform predictor)."""
    counts = torch.zeros(VOCAB_SIZE, dtype=torch.float64)
    for r in train.regions:
        counts += torch.bincount(train.tokenizer.encode(train.fetch(r.key, r.start, r.end)), minlength=VOCAB_SIZE)
    logp = torch.full((VOCAB_SIZE,), -math.inf, dtype=torch.float64)
    logp[BASE_IDS:] = ((counts[BASE_IDS:] + 1) / (counts[BASE_IDS:] + 1).sum()).log()
    targets = torch.cat([ids[1:] for ids, _ in eval_set])
    return math.exp(-logp[targets[targets >= BASE_IDS]].mean().item())
