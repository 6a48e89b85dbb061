"""Discrete-time survival for MIL models (the mahmoodlab / MambaMIL conventions).

Times are split into `n_bins` intervals (`survival_bins`); the model outputs one logit per bin:
hazard h_k = sigmoid(logit_k) = P(event in bin k | alive at its start), survival S_k = prod_{j<=k}(1 - h_j),
risk = -sum_k S_k (higher = shorter survival). `censorship` is 1 for a censored patient (alive at the
last follow-up) and 0 for an observed event, as in the mahmoodlab CSVs.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["survival_bins", "discretize", "hazards_and_survival", "risk_score", "nll_survival_loss",
           "concordance_index"]


def survival_bins(times, censorship, n_bins: int = 4, eps: float = 1e-6) -> np.ndarray:
    """Bin edges (n_bins + 1): quantiles of the uncensored times, outer edges stretched to min - eps
    and max + eps of all times so every patient falls in a bin."""
    times, censorship = np.asarray(times, dtype=float), np.asarray(censorship, dtype=float)
    events = times[censorship == 0]
    if events.size < n_bins:
        raise ValueError(f"survival_bins needs at least {n_bins} uncensored patients, got {events.size}")
    edges = np.quantile(events, np.linspace(0, 1, n_bins + 1))
    edges[0], edges[-1] = times.min() - eps, times.max() + eps
    if np.any(np.diff(edges) <= 0):
        raise ValueError(f"survival bin edges are not increasing ({edges.tolist()}); too many tied times")
    return edges


def discretize(times, edges: np.ndarray) -> np.ndarray:
    """Bin index in 0..len(edges)-2 of each time, bins closed on the left; times outside the edges are
    clamped to the first or last bin."""
    idx = np.searchsorted(np.asarray(edges)[1:-1], np.asarray(times, dtype=float), side="right")
    return idx.astype(np.int64)


def hazards_and_survival(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hazards, survival), each shaped like logits (batch, n_bins)."""
    hazards = torch.sigmoid(logits)
    return hazards, torch.cumprod(1 - hazards, dim=-1)


def risk_score(logits: torch.Tensor) -> torch.Tensor:
    """risk = -sum_k S_k per row of logits (batch, n_bins): higher means an earlier expected event."""
    return -hazards_and_survival(logits)[1].sum(-1)


def nll_survival_loss(logits: torch.Tensor, bins: torch.Tensor, censorship: torch.Tensor,
                      alpha: float = 0.0, eps: float = 1e-7) -> torch.Tensor:
    """Discrete-time survival negative log-likelihood (Zadeh & Schmid), averaged over the batch.

    With S_pad = [1, S_0, ..., S_{K-1}] and y the bin: an event costs -(log S_pad[y] + log h_y) (alive at
    the start of bin y, dies in it), a censored patient -log S_pad[y+1] (survives bin y). The loss is
    (1 - alpha) * (both terms) + alpha * (event term); MambaMIL trains with alpha = 0. Logs are clamped
    at `eps`."""
    hazards, surv = hazards_and_survival(logits.float())
    y = bins.long().view(-1, 1)
    c = censorship.float().view(-1, 1)
    s_pad = torch.cat([torch.ones_like(surv[:, :1]), surv], dim=1)
    event_term = -(1 - c) * (torch.log(s_pad.gather(1, y).clamp(min=eps))
                             + torch.log(hazards.gather(1, y).clamp(min=eps)))
    censored_term = -c * torch.log(s_pad.gather(1, y + 1).clamp(min=eps))
    return ((1 - alpha) * (event_term + censored_term) + alpha * event_term).mean()


def concordance_index(time, event, risk, tied_tol: float = 1e-8) -> float:
    """Harrell's c-index with scikit-survival's conventions (`concordance_index_censored`).

    A pair (i, j) is comparable when i has an event and t_i < t_j, or t_i == t_j and j is censored. It is
    concordant when risk_i > risk_j; risks within `tied_tol` count 1/2. NaN when no pair is comparable."""
    time, event, risk = (np.asarray(a, dtype=float).ravel() for a in (time, event, risk))
    if not (time.size == event.size == risk.size):
        raise ValueError(f"time, event and risk must have one value per patient; got {time.size}, "
                         f"{event.size}, {risk.size}")
    ev = event.astype(bool)
    ti, tj = time[:, None], time[None, :]
    comparable = ev[:, None] & ((ti < tj) | ((ti == tj) & ~ev[None, :]))
    diff = risk[:, None] - risk[None, :]
    tied = np.abs(diff) <= tied_tol
    concordant = comparable & ~tied & (diff > 0)
    n = comparable.sum()
    return float((concordant.sum() + 0.5 * (comparable & tied).sum()) / n) if n else float("nan")
