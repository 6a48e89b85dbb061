"""Survival bins, the discrete-time NLL against hand values, the c-index against a brute-force count."""
import math

import numpy as np
import pytest
import torch

from ssmkit.medical.survival import (concordance_index, discretize, hazards_and_survival, nll_survival_loss,
                                     risk_score, survival_bins)


def test_bins_from_uncensored_quartiles_with_stretched_ends():
    times = [1, 2, 3, 4, 5, 10, 0.5]
    cens = [0, 0, 0, 0, 0, 1, 1]
    edges = survival_bins(times, cens)
    np.testing.assert_allclose(edges, [0.5 - 1e-6, 2, 3, 4, 10 + 1e-6])
    assert discretize([0.5, 1.99, 2.0, 3.5, 4.0, 10.0], edges).tolist() == [0, 0, 1, 2, 3, 3]
    with pytest.raises(ValueError, match="uncensored"):
        survival_bins([1, 2, 3], [0, 1, 1])


def test_survival_head():
    logits = torch.tensor([[-1.0, 0.0, 2.0, 5.0]])
    hazards, surv = hazards_and_survival(logits)
    assert ((hazards > 0) & (hazards < 1)).all() and (surv.diff(dim=-1) <= 0).all()
    torch.testing.assert_close(risk_score(logits), -surv.sum(-1))


def test_nll_loss_against_hand_values():
    logits = torch.zeros(4, 4)  # every hazard 1/2: S = 1/2, 1/4, 1/8, 1/16
    bins = torch.tensor([0, 1, 1, 3])
    cens = torch.tensor([0.0, 0.0, 1.0, 1.0])
    # event in bin 0: -log h0 = log 2; event in bin 1: -(log S0 + log h1) = 2 log 2;
    # censored in bin 1: -log S1 = 2 log 2; censored in bin 3: -log S3 = 4 log 2
    per_patient = [math.log(2), 2 * math.log(2), 2 * math.log(2), 4 * math.log(2)]
    loss = nll_survival_loss(logits, bins, cens, alpha=0.0)
    assert loss.item() == pytest.approx(sum(per_patient) / 4)
    events_only = (per_patient[0] + per_patient[1]) / 4
    assert nll_survival_loss(logits, bins, cens, alpha=0.4).item() == pytest.approx(0.6 * sum(per_patient) / 4
                                                                                    + 0.4 * events_only)
    extreme = nll_survival_loss(torch.full((1, 4), 60.0), torch.tensor([3]), torch.tensor([1.0]))
    assert torch.isfinite(extreme)


def brute_force_cindex(time, event, risk):
    concordant = comparable = 0.0
    for i in range(len(time)):
        for j in range(len(time)):
            if i == j or not event[i]:
                continue
            if time[i] < time[j] or (time[i] == time[j] and not event[j]):
                comparable += 1
                if abs(risk[i] - risk[j]) <= 1e-8:
                    concordant += 0.5
                elif risk[i] > risk[j]:
                    concordant += 1
    return concordant / comparable


def test_cindex_against_brute_force_with_ties():
    rng = np.random.default_rng(0)
    time = rng.integers(1, 12, 60).astype(float)  # many tied times
    event = rng.random(60) < 0.5
    risk = np.round(rng.standard_normal(60), 1)  # tied risks
    assert concordance_index(time, event, risk) == pytest.approx(brute_force_cindex(time, event, risk))
    t = np.arange(1.0, 9.0)
    assert concordance_index(t, np.ones(8), -t) == 1.0
    assert concordance_index(t, np.ones(8), t) == 0.0
    assert concordance_index(t, np.ones(8), np.zeros(8)) == 0.5


def test_cindex_matches_scikit_survival():
    sksurv = pytest.importorskip("sksurv.metrics", reason="scikit-survival is an optional oracle")
    rng = np.random.default_rng(1)
    time, event, risk = rng.integers(1, 20, 80).astype(float), rng.random(80) < 0.6, rng.standard_normal(80)
    expected = sksurv.concordance_index_censored(event, time, risk)[0]
    assert concordance_index(time, event, risk) == pytest.approx(expected)
