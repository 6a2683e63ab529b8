"""Variance of ES-Single and PES against their closed forms.

For a loss quadratic in theta, one pair's ES estimate is ``eps eps^T g / sigma^2``, whose
total variance is ``(P + 1) ||g||^2``. ES-Single's per-episode sum of online estimates is
exactly the full-unroll ES estimate on the same noise, so its variance does not depend
on how many windows the episode is cut into. PES credits window j with the sum of all
noise so far; when per-window gradients g_j are independent its total variance is
``sum_j (P + 1 + (j - 1) P) ||g_j||^2``, which grows with the number of windows.
"""

from __future__ import annotations

import numpy as np
import pytest

import keras_es
from keras_es import testing
from keras_es.testing import run_windows

P, T = 4, 16
PAIRS = 200_000
SIGMA = 0.1


@pytest.fixture(scope="module")
def system_and_gradients():
    targets = np.random.default_rng(0).normal(size=(T, P))
    # At theta = 0 the gradient of step t's loss is -a_t.
    return testing.MemorylessSystem(targets), -targets


def _check(variance, se, theory):
    z = (variance - theory) / se
    assert abs(variance / theory - 1.0) < 0.05, (variance, theory, z)
    assert abs(z) < 4.0, (variance, theory, z)
    # 5% must be a meaningful tolerance at this sample size, not a loose one.
    assert 0.05 * theory > 3.0 * se


@pytest.fixture(scope="module")
def es_single_totals(system_and_gradients):
    system, _ = system_and_gradients
    out = {}
    for k in (1, 4, 16):
        estimator = keras_es.es_single(SIGMA, k, horizon=T, stagger=False)
        out[k], _ = run_windows(estimator, system, np.zeros(P), PAIRS, T // k, seed=11)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 4, 16])
def test_es_single_variance_is_p_plus_one_norm_squared(k, es_single_totals,
                                                       system_and_gradients):
    _, grads = system_and_gradients
    g = grads.sum(0)
    variance, se = testing.total_variance(es_single_totals[k])
    _check(variance, se, testing.es_total_variance(g))


def test_es_single_online_sum_equals_full_unroll_es(es_single_totals, system_and_gradients):
    system, _ = system_and_gradients
    full, _ = run_windows(keras_es.full_es(SIGMA, horizon=T), system, np.zeros(P), PAIRS, 1,
                          seed=11)
    for k in (1, 4):
        np.testing.assert_allclose(es_single_totals[k], full, rtol=1e-4, atol=1e-3)


@pytest.fixture(scope="module")
def pes_variances(system_and_gradients):
    system, grads = system_and_gradients
    out = {}
    for k in (1, 4, 16):
        estimator = keras_es.pes(SIGMA, k, horizon=T, stagger=False)
        totals, _ = run_windows(estimator, system, np.zeros(P), PAIRS, T // k, seed=11)
        theory = testing.pes_total_variance(grads.reshape(T // k, k, P).sum(1))
        out[k] = (*testing.total_variance(totals), theory)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 4, 16])
def test_pes_variance_matches_closed_form(k, pes_variances):
    variance, se, theory = pes_variances[k]
    _check(variance, se, theory)


def test_pes_variance_grows_with_windows_es_single_does_not(pes_variances, es_single_totals):
    pes = {k: pes_variances[k][0] for k in (1, 4, 16)}
    es = {k: testing.total_variance(es_single_totals[k])[0] for k in (1, 4, 16)}
    # 16 windows of one step vs one window of 16 steps.
    assert pes[1] > 5.0 * pes[16]
    assert pes[4] > 1.5 * pes[16]
    assert abs(es[1] / es[16] - 1.0) < 1e-3
